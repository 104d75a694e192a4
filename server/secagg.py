"""The server's side of secure aggregation over Flower messages (protocol: federation/secagg).

One group per task (a task's devices share a vector layout), all groups advancing together:
three pushes per round (keys + training, masks, unmask), four with certified device keys (run
config `secagg-pki`: a consistency check of the survivor set before anything is revealed),
whatever the number of dropouts. The server only ever handles public keys, sealed shares,
masked vectors, signatures, revealed shares and seeds, and finally the decoded *sum* of the
devices' contributions, which it checks (`vector.check_plausible_sum`) before applying it.
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

from federation.secagg.packing import unpack_residues
from federation.secagg.protocol import Params, Reveal, SecAggAbort, ServerRound, member_ids, plan
from federation.secagg.vector import check_plausible_sum, decode_total, dp_value_length, vector_length
from server.messaging import send_and_stream
from server.round import RoundResult

if TYPE_CHECKING:
    from server.loop import RunState

KEYS, MASK, CHECK, UNMASK = (f"{MessageType.TRAIN}.secagg_{s}" for s in ("keys", "mask", "check", "unmask"))


@dataclass
class Group:
    task: str
    nodes: list[int]  # Flower node ids
    ids: dict[int, int]  # node id -> protocol id
    params: Params
    state: ServerRound
    node_of: dict[int, int] = field(default_factory=dict)  # protocol id -> node id

    def nodes_named(self, ids: Any) -> list[int]:
        return [self.node_of.get(i, -1) for i in ids]


def _message(node: int, message_type: str, config: Mapping[str, Any], **records: Any) -> Message:
    content = RecordDict({"config": ConfigRecord(dict(config)), **records})
    return Message(content, dst_node_id=node, message_type=message_type)


def _failed(reply: Message, node: int, server_round: int, stage: str) -> bool:
    """Log and report a reply that cannot be used: an error, or one for another round."""
    if reply.has_error():
        reason = reply.error.reason
    else:
        metrics = reply.content.get("metrics") if reply.has_content() else None
        if metrics is not None and metrics.get("server-round") == server_round:
            return False
        reason = "reply for another round"
    log(WARNING, "fedge: node %d failed in round %d (%s): %s", node, server_round, stage, reason)
    return True


def plan_groups(fed: RunState, server_round: int, chosen: list[int]) -> list[Group]:
    """One group per task among the chosen devices; a task below secagg-min-devices sits out."""
    run = fed.run
    ca_public = None
    if run.secagg_pki:
        from federation.secagg.pki import load_ca_public

        ca_public = load_ca_public(run.secagg_pki)
    by_task: dict[str, list[int]] = {}
    for node in chosen:
        by_task.setdefault(fed.registry.nodes[node].task, []).append(node)
    groups = []
    for task, nodes in by_task.items():
        if len(nodes) < run.secagg_min_devices:
            # A sum of two updates tells each device the other's: too few to hide anyone.
            log(WARNING, "fedge: round %d: only %d %s devices, secure aggregation needs %d; %s sits out",
                server_round, len(nodes), task, run.secagg_min_devices, task)  # fmt: skip
            continue
        try:
            shapes = fed.task_shapes(task)
            params = plan(
                fed.run_id % 2**63,
                server_round,
                task,
                len(nodes),
                vector_length(run.rule, shapes, dp=run.dp),
                clip=run.secagg_clip,
                value_bits=run.secagg_value_bits,
                max_weight=1 if run.dp else run.task_max_weight(task),
                dp_mechanism=run.dp_mechanism,
                dp_noise_multiplier=run.dp_noise_multiplier,
                dp_clip=run.dp_clip,
                dp_length=dp_value_length(run.rule, shapes) if run.dp else 0,
            )
        except (SecAggAbort, ValueError) as exc:
            log(
                WARNING,
                "fedge: secure aggregation: %s task left out of round %d: %s",
                task,
                server_round,
                exc,
            )
            continue
        ids = member_ids(nodes)
        state = ServerRound(params, ca_public=ca_public)
        groups.append(Group(task, nodes, ids, params, state, {i: n for n, i in ids.items()}))
    return groups


def secure_train_round(fed: RunState, server_round: int, chosen: list[int]) -> RoundResult:
    """A training round whose aggregate the server learns only as a sum (applied by the loop)."""
    run = fed.run
    all_groups = plan_groups(fed, server_round, chosen)
    groups = {node: group for group in all_groups for node in group.nodes}
    stats: dict[str, Any] = {"participants": {}, "failures": 0, "rejected": 0, "vanished": 0, "aborted": [],
                             "releases": []}  # fmt: skip
    losses: dict[str, list[float]] = {}
    upload = download = 0
    stage_seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_seconds[stage] = now - clock
        clock = now

    def replies(messages: list[Message], stage: str):  # -> (reply, node, group) of usable replies
        for node, reply in send_and_stream(fed.grid, messages, run.round_timeout):
            group = groups.get(node)
            if group is None:
                log(WARNING, "fedge: round %d (%s): reply from node %d, which is in no group; ignored",
                    server_round, stage, node)  # fmt: skip
                continue
            if _failed(reply, node, server_round, stage):
                if stage == "keys + training":
                    stats["failures"] += 1
                continue
            yield reply, node, group

    def reject(node: int, stage: str, exc: BaseException) -> None:
        stats["rejected"] += 1
        log(WARNING, "fedge: node %d's %s reply rejected in round %d: %s", node, stage, server_round, exc)

    # Step 1: global state + parameters; devices check them, train, answer with public keys.
    messages = []
    for group in all_groups:
        arrays = fed.task_record(group.task)
        for node in group.nodes:
            config = {"server-round": server_round, "task": group.task, **group.params.to_config()}
            config["sa-my-id"] = group.ids[node]
            messages.append(_message(node, KEYS, config, arrays=arrays))
            download += arrays.count_bytes()
    for reply, node, group in replies(messages, "keys + training"):
        try:
            keys = reply.content["keys"]
            credential = (bytes(keys["cert"]), bytes(keys["sig"])) if group.state.ca_public else None
            group.state.add_keys(group.ids[node], bytes(keys["c-pk"]), bytes(keys["s-pk"]), credential)
            losses.setdefault(group.task, []).append(float(reply.content["metrics"]["train_loss"]))
        except (KeyError, ValueError, TypeError) as exc:
            reject(node, "keys", exc)  # counted as never arrived: no neighbour masks with it
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
            if group.state.ca_public:
                creds = group.state.peer_credentials_for(pid)
                config["peer-cert"] = [creds[j][0] for j in peers]
                config["peer-sig"] = [creds[j][1] for j in peers]
            messages.append(_message(group.node_of[pid], MASK, config))
    for reply, node, group in replies(messages, "mask: vanished after sharing keys"):
        try:
            shares = reply.content["shares"]
            sealed = {int(j): bytes(ct) for j, ct in zip(shares["to"], shares["sealed"], strict=True)}
            packed = reply.content["masked"]["y"].numpy()
            masked = unpack_residues(packed, group.params.modulus_bits, group.params.length)
            group.state.add_masked(group.ids[node], sealed, masked)
            upload += reply.content["masked"].count_bytes() + sum(len(ct) for ct in sealed.values())
        except (KeyError, ValueError, TypeError) as exc:
            reject(node, "masked vector", exc)
    lap("mask")
    for group in all_groups:
        stats["vanished"] += len(group.state.vanished())

    # Step 3 (certified keys): every survivor signs the survivor set it is shown.
    if any(group.state.ca_public for group in all_groups):
        messages = []
        for group in all_groups:
            survivors = sorted(group.state.survivors)
            for pid in survivors:
                config = {**group.params.to_config(), "server-round": server_round, "survivors": survivors}
                messages.append(_message(group.node_of[pid], CHECK, config))
        for reply, node, group in replies(messages, "consistency check"):
            try:
                group.state.add_endorsement(group.ids[node], bytes(reply.content["endorsement"]["sig"]))
            except (KeyError, ValueError, TypeError) as exc:
                reject(node, "consistency check", exc)
        lap("check")

    # Last step: who survived; survivors reveal what recovery needs.
    messages = []
    for group in all_groups:
        survivors = sorted(group.state.survivors)
        for pid in survivors:
            sealed = group.state.sealed_for(pid)
            config = {
                **group.params.to_config(),
                "server-round": server_round,
                "survivors": survivors,
                "from": list(sealed),
                "sealed": list(sealed.values()),
            }
            if group.state.ca_public:
                endorsements = group.state.endorsements_for(pid)
                config["endorsers"] = list(endorsements)
                config["endorsements"] = list(endorsements.values())
            messages.append(_message(group.node_of[pid], UNMASK, config))
    for reply, node, group in replies(messages, "unmask"):
        try:
            record = reply.content["reveal"]
            reveal = Reveal(
                {int(o): bytes(s) for o, s in zip(record["share-owners"], record["shares"], strict=True)},
                {int(j): bytes(s) for j, s in zip(record["pair-ids"], record["pair-seeds"], strict=True)},
                [int(j) for j in record["tampered"]],
            )
            group.state.add_reveal(group.ids[node], reveal)
        except (KeyError, ValueError, TypeError) as exc:
            reject(node, "reveal", exc)
    lap("unmask")

    rule = run.rule
    total = rule.init()
    for group in all_groups:
        if _finish_group(fed, group, server_round, total):
            if group.params.dp:
                from federation.privacy.accountant import Release

                release = Release(group.task, group.params.dp_plan(), len(group.state.survivors))
                stats["releases"].append(release)
            for pid in group.state.survivors:
                device_class = fed.registry.nodes[group.node_of[pid]].device_class
                stats["participants"][device_class] = stats["participants"].get(device_class, 0) + 1
        else:
            stats["aborted"].append(group.task)
    lap("reconstruct+decode")
    return RoundResult(
        secure=True,
        sampled=len(chosen),
        participants=stats["participants"],
        failures=stats["failures"],
        rejected=stats["rejected"],
        upload_bytes=upload,
        download_bytes=download,
        train_loss={t: float(np.mean(v)) for t, v in losses.items()},
        aggregate=total,
        vanished=stats["vanished"],
        aborted=stats["aborted"],
        secagg_stage_seconds=stage_seconds,
        dp_releases=stats["releases"],
    )


def _finish_group(fed: RunState, group: Group, server_round: int, total: Any) -> bool:
    """Unmask, decode and check one group's sum; fold it into `total` or log why not (the global
    model of that task then stays as it was)."""
    state = group.state
    try:
        vector = state.finish()
        rule = fed.run.rule
        survivors = len(state.survivors)
        decoded = decode_total(rule, vector, fed.task_shapes(group.task), group.params, survivors)
        weight = check_plausible_sum(rule, decoded, fed.task_shapes(group.task), group.params, survivors)
    except SecAggAbort as exc:
        blame = f" (nodes at fault: {group.nodes_named(exc.blame)})" if exc.blame else ""
        log(WARNING, "fedge: round %d: %s update aborted, global %s model unchanged: %s%s",
            server_round, group.task, group.task, exc, blame)  # fmt: skip
        return False
    finally:
        for pid, what in sorted(state.blamed.items()):
            log(
                WARNING,
                "fedge: round %d %s: node %d %s",
                server_round,
                group.task,
                group.node_of.get(pid, -1),
                what,
            )
    fed.run.rule.add(total, {f"{group.task}/{k}": v for k, v in decoded.items()})  # the sum, added once
    log(INFO, "fedge: round %d %s: secure sum of %d devices (m=%d bits, degree %d, threshold %d, weight %g)",
        server_round, group.task, len(state.survivors), group.params.modulus_bits, group.params.degree,
        group.params.threshold, weight)  # fmt: skip
    if group.params.dp:
        dp = group.params.dp_plan()
        log(INFO, "fedge: round %d %s: %s noise, multiplier %g of %d planned devices (%d survived), "
            "modulus wrap probability %.3g", server_round, group.task, dp.mechanism, dp.noise_multiplier,
            dp.n, len(state.survivors), dp.wrap_probability)  # fmt: skip
    return True
