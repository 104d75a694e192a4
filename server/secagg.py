"""The server's side of secure aggregation over Flower messages (protocol: federation/secagg).

One group per task (a task's devices share a vector layout), all groups advancing together:
three pushes per round (keys + training, masks, unmask), whatever the number of dropouts. The
server only ever handles public keys, sealed shares, masked vectors, revealed shares and seeds,
and finally the decoded *sum* of the devices' contributions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from federation import aggregation
from federation.secagg.protocol import Params, Reveal, SecAggAbort, ServerRound, member_ids, plan
from federation.secagg.vector import decode_total, vector_length
from server.messaging import send_and_stream

if TYPE_CHECKING:
    from server.loop import Federation

KEYS, MASK, UNMASK = (f"{MessageType.TRAIN}.secagg_{s}" for s in ("keys", "mask", "unmask"))


@dataclass
class Group:
    task: str
    nodes: list[int]  # Flower node ids
    ids: dict[int, int]  # node id -> protocol id
    params: Params
    state: ServerRound
    node_of: dict[int, int] = field(default_factory=dict)  # protocol id -> node id


def _message(node: int, message_type: str, config: Mapping[str, Any], **records: Any) -> Message:
    content = RecordDict({"config": ConfigRecord(dict(config)), **records})
    return Message(content, dst_node_id=node, message_type=message_type)


def _failed(reply: Message, server_round: int, stage: str) -> bool:
    """Log and report a reply that cannot be used: an error, or one for another round."""
    if reply.has_error():
        reason = reply.error.reason
    else:
        metrics = reply.content.get("metrics") if reply.has_content() else None
        if metrics is not None and metrics.get("server-round") == server_round:
            return False
        reason = "reply for another round"
    node = reply.metadata.src_node_id
    log(WARNING, "fedge: node %d failed in round %d (%s): %s", node, server_round, stage, reason)
    return True


def secure_train_round(fed: Federation, server_round: int, chosen: list[int]) -> dict[str, Any]:
    """A training round whose aggregate the server learns only as a sum."""
    run = fed.run
    by_task: dict[str, list[int]] = {}
    for node in chosen:
        by_task.setdefault(fed.registry.nodes[node].task, []).append(node)
    groups: dict[int, Group] = {}  # node id -> its group
    all_groups: list[Group] = []
    for task, nodes in by_task.items():
        shapes = fed.task_shapes(task)
        if len(nodes) < run.secagg_min_devices:
            # A sum of two updates tells each device the other's: too few to hide anyone.
            log(WARNING, "fedge: round %d: only %d %s devices, secure aggregation needs %d; %s sits out",
                server_round, len(nodes), task, run.secagg_min_devices, task)  # fmt: skip
            continue
        try:
            params = plan(
                fed.run_id % 2**63,
                server_round,
                task,
                len(nodes),
                vector_length(shapes),
                clip=run.secagg_clip,
                value_bits=run.secagg_value_bits,
                max_weight=int(run.max_weight),
            )
        except SecAggAbort as exc:
            log(
                WARNING,
                "fedge: secure aggregation: %s task left out of round %d: %s",
                task,
                server_round,
                exc,
            )
            continue
        ids = member_ids(nodes)
        group = Group(task, nodes, ids, params, ServerRound(params), {i: n for n, i in ids.items()})
        all_groups.append(group)
        groups.update(dict.fromkeys(nodes, group))
    stats: dict[str, Any] = {"participants": {}, "failures": 0, "rejected": 0, "vanished": 0, "aborted": []}
    losses: dict[str, list[float]] = {}
    upload = download = 0
    stage_seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_seconds[stage] = now - clock
        clock = now

    # Step 1: global state + parameters; devices train and answer with public keys.
    messages = []
    for group in all_groups:
        arrays = fed.task_record(group.task)
        for node in group.nodes:
            config = {"server-round": server_round, "task": group.task, **group.params.to_config()}
            config["sa-my-id"] = group.ids[node]
            messages.append(_message(node, KEYS, config, arrays=arrays))
            download += arrays.count_bytes()
    for reply in send_and_stream(fed.grid, messages, run.round_timeout):
        node = reply.metadata.src_node_id
        group = groups[node]
        if _failed(reply, server_round, "keys + training"):
            stats["failures"] += 1
            continue
        keys = reply.content["keys"]
        try:
            group.state.add_keys(group.ids[node], bytes(keys["c-pk"]), bytes(keys["s-pk"]))
        except (KeyError, ValueError) as exc:
            stats["rejected"] += 1
            log(WARNING, "fedge: node %d sent malformed keys in round %d: %s", node, server_round, exc)
            continue
        losses.setdefault(group.task, []).append(float(reply.content["metrics"]["train_loss"]))

    lap("keys+train")

    # Step 2: neighbours' public keys; devices answer with sealed shares and masked vectors.
    messages = []
    for group in all_groups:
        for pid in sorted(group.state.keys):
            peers = group.state.peer_keys_for(pid)
            config = {
                **group.params.to_config(),
                "server-round": server_round,
                "peer-ids": list(peers),
                "peer-c": [peers[j][0] for j in peers],
                "peer-s": [peers[j][1] for j in peers],
            }
            messages.append(_message(group.node_of[pid], MASK, config))
    for reply in send_and_stream(fed.grid, messages, run.round_timeout):
        node = reply.metadata.src_node_id
        group = groups[node]
        if _failed(reply, server_round, "mask: vanished after sharing keys"):
            continue
        try:
            shares = reply.content["shares"]
            sealed = {int(j): bytes(ct) for j, ct in zip(shares["to"], shares["sealed"], strict=True)}
            masked = reply.content["masked"]["y"].numpy()
            upload += reply.content["masked"].count_bytes()
            group.state.add_masked(group.ids[node], sealed, masked)
        except (KeyError, ValueError, TypeError) as exc:
            stats["rejected"] += 1
            log(WARNING, "fedge: node %d's masked vector rejected in round %d: %s", node, server_round, exc)

    lap("mask")

    # Step 3: who survived; survivors reveal what recovery needs.
    messages = []
    for group in all_groups:
        survivors, vanished = sorted(group.state.survivors), sorted(group.state.vanished())
        stats["vanished"] += len(vanished)
        for pid in survivors:
            sealed = group.state.sealed_for(pid)
            config = {
                **group.params.to_config(),
                "server-round": server_round,
                "survivors": survivors,
                "vanished": vanished,
                "from": list(sealed),
                "sealed": list(sealed.values()),
            }
            messages.append(_message(group.node_of[pid], UNMASK, config))
    for reply in send_and_stream(fed.grid, messages, run.round_timeout):
        node = reply.metadata.src_node_id
        group = groups[node]
        if _failed(reply, server_round, "unmask"):
            continue
        record = reply.content["reveal"]
        reveal = Reveal(
            {int(o): bytes(s) for o, s in zip(record["share-owners"], record["shares"], strict=True)},
            {int(j): bytes(s) for j, s in zip(record["pair-ids"], record["pair-seeds"], strict=True)},
            [int(j) for j in record["tampered"]],
        )
        for sender in reveal.tampered:
            log(WARNING, "fedge: node %d received a tampered share from node %d in round %d; ignored",
                node, group.node_of.get(sender, -1), server_round)  # fmt: skip
        group.state.add_reveal(group.ids[node], reveal)

    lap("unmask")
    total = aggregation.init()
    for group in all_groups:
        try:
            vector = group.state.finish()
        except SecAggAbort as exc:
            stats["aborted"].append(group.task)
            log(WARNING, "fedge: round %d: %s update aborted, global %s model unchanged: %s",
                server_round, group.task, group.task, exc)  # fmt: skip
            continue
        decoded = decode_total(vector, fed.task_shapes(group.task), group.params)
        aggregation.add(total, {f"{group.task}/{k}": v for k, v in decoded.items()})
        cls_counts = stats["participants"]
        for pid in group.state.survivors:
            device_class = fed.registry.nodes[group.node_of[pid]].device_class
            cls_counts[device_class] = cls_counts.get(device_class, 0) + 1
        log(INFO, "fedge: round %d %s: secure sum of %d devices (m=%d bits, degree %d, threshold %d)",
            server_round, group.task, len(group.state.survivors), group.params.modulus_bits,
            group.params.degree, group.params.threshold)  # fmt: skip
    fed.state = aggregation.apply(total, fed.state)
    lap("reconstruct+decode")
    stats.update(
        {
            "sampled": len(chosen),
            "upload_bytes": upload,
            "download_bytes": download,
            "train_loss": {t: float(np.mean(v)) for t, v in losses.items()},
            "secure": True,
            "secagg_stage_seconds": stage_seconds,
        }
    )
    return stats
