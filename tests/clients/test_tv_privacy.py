"""A TV's private part never leaves the device: every handler, driven by the real server code.

Four TV nodes of the `smoke` fleet run fedge's real ClientApp in-process behind a loopback
`Grid` (below) that hands each message to the addressed node's ClientApp and keeps the reply.
The real ServerApp code drives them: check-in (`check_in`), a secure round
(`secure_train_round`: keys + training, masks, unmask), a plain round (`RunState.train_round`)
and on-device evaluation (`RunState.evaluate_federated`). Then every reply is checked:

- its exact records and keys (the table below is the wire contract a reply may carry; a new
  field must be added here on purpose), and
- that no version of any TV's private vector, read from the device's own `context.state` after
  every message, is in it: not its bytes (float32, as stored, nor float64) anywhere in the
  serialised reply, nor any of its values (as float32 or float64) among the numbers of a
  config or metric record.

The walk over a reply is generic (any RecordDict), so a change of the secure stages' wire format
only needs the table updated.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from federation.config import RunConfig
from federation.fleet import device_for_partition
from federation.model.edge import task_slice

RUN_ID = 77
KEYS, MASK, UNMASK = (f"{MessageType.TRAIN}.secagg_{s}" for s in ("keys", "mask", "unmask"))
TV_SHARED = {"head.item.weight", "head.item.bias", "head.global_bias"}  # + every LoRA B of MiniLM

# Records and keys each reply may carry (record -> keys; None: the keys are the shared state's).
EXPECTED_REPLY: dict[str, dict[str, set[str] | None]] = {
    MessageType.QUERY: {"device": {"device-class", "task", "data-client", "tier", "rank"}},
    MessageType.TRAIN: {
        "arrays": None,
        "metrics": {"train_loss", "num-examples", "train_seconds", "server-round", "upload-bytes"},
    },
    MessageType.EVALUATE: {  # held-out sums in plaintext: counts, score histograms, own AUC x count
        "metrics": {
            "loss_sum",
            "count",
            "correct",
            "pos_hist",
            "neg_hist",
            "viewer_auc_sum",
            "viewer_count",
            "num-examples",
            "server-round",
        }
    },
    KEYS: {"keys": {"c-pk", "s-pk"}, "metrics": {"server-round", "train_loss", "train_seconds"}},
    MASK: {"shares": {"to", "sealed"}, "masked": {"y"}, "metrics": {"server-round"}},
    UNMASK: {
        "reveal": {"share-owners", "shares", "pair-ids", "pair-seeds", "tampered"},
        "metrics": {"server-round"},
    },
}

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class LoopbackGrid(Grid):
    """A Grid whose nodes are ClientApps in this process: a pushed message is handled at once
    by its node's app and context (an exception becomes an error reply, as a SuperNode's
    runtime makes it); every (message, reply) pair is kept, and the node's private part is
    read from its state after each message."""

    def __init__(self, app: Any, contexts: dict[int, Context], private_key: str) -> None:
        self.app, self.contexts, self.private_key = app, contexts, private_key
        self.replies: dict[str, Message] = {}
        self.log: list[tuple[str, int, Message]] = []  # (message type, node, reply)
        self.private_versions: list[np.ndarray] = []
        self._run: Any = None

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        self._run = run_id

    @property
    def run(self) -> Any:  # type: ignore[override]
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            context = self.contexts[node]
            try:
                reply = self.app(msg, context)
            except Exception as exc:
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.log.append((msg.metadata.message_type, node, reply))
            stored = context.state.get(self.private_key)
            if isinstance(stored, ArrayRecord):
                self.private_versions.append(stored["user"].numpy().copy())
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


# ------------------------------------------------------------------------- walking a reply


def _numbers(value: Any) -> Iterator[float]:
    """Every number in a config or metric value (scalars and lists)."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            yield float(item)


def _blobs(content: RecordDict) -> Iterator[bytes]:
    """Every bytes-like payload of a RecordDict: array data, bytes and str config values."""
    for record in content.values():
        if isinstance(record, ArrayRecord):
            yield from (array.numpy().tobytes() for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        yield item
                    elif isinstance(item, str):
                        yield item.encode()


def _wire_bytes(message: Message) -> bytes:
    """The message as Flower serialises it for transport (every object of its tree)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


def private_leaks(content: RecordDict, wire: bytes, private: np.ndarray) -> list[str]:
    """Where `private` shows in a reply: whole-vector bytes anywhere, or any of its values
    among the numbers of its config and metric records."""
    found = []
    for form in (np.float32, np.float64):
        needle = np.asarray(private, dtype=form).tobytes()
        if needle in wire or any(needle in blob for blob in _blobs(content)):
            found.append(f"the private vector's {form.__name__} bytes")
    values = {float(v) for v in np.asarray(private, np.float32) if v != 0}
    values |= {float(np.float64(v)) for v in np.asarray(private, np.float64) if v != 0}
    for name, record in content.items():
        if isinstance(record, (MetricRecord, ConfigRecord)):
            for key, value in record.items():
                if values & set(_numbers(value)):
                    found.append(f"a private value in {name}[{key!r}]")
    return found


# ------------------------------------------------------------------------------------ setup


@pytest.fixture(scope="module")
def tv_rounds(app: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoopbackGrid, dict[str, Any]]:
    from clients.client_app import PRIVATE_KEY
    from server.loop import RunState, check_in
    from server.secagg import secure_train_round

    run_config = {
        "scenario": "smoke",
        "local-steps": 2,
        "device-clock": False,
        "out-dir": str(tmp_path_factory.mktemp("tv-privacy")),
    }
    run = RunConfig.parse(run_config)
    scenario = run.scenario
    tvs = [p for p in range(scenario.size) if device_for_partition(scenario, p, run.seed).task == "tv"]
    assert len(tvs) >= run.secagg_min_devices
    contexts = {
        1000 + p: Context(
            run_id=RUN_ID,
            node_id=1000 + p,
            node_config={"partition-id": p, "num-partitions": scenario.size},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for p in tvs
    }
    grid = LoopbackGrid(app, contexts, PRIVATE_KEY)
    fed = RunState(grid, run, RUN_ID)
    nodes = sorted(contexts)
    check_in(grid, fed.registry, nodes, timeout=60)
    results: dict[str, Any] = {"secure": secure_train_round(fed, 1, nodes)}
    fed.run = dataclasses.replace(run, secure_aggregation=False)
    results["plain"] = fed.train_round(2)
    results["federated"] = fed.evaluate_federated(2, ("tv",))
    results["shared_keys"] = set(task_slice(fed.state, "tv"))
    return grid, results


# ------------------------------------------------------------------------------------ tests


def test_every_handler_ran_and_succeeded(tv_rounds: tuple[LoopbackGrid, dict[str, Any]]) -> None:
    grid, results = tv_rounds
    assert {kind for kind, _, _ in grid.log} == set(EXPECTED_REPLY)
    assert not [(kind, node) for kind, node, reply in grid.log if reply.has_error()]
    assert results["secure"].participants == {"tv": len(grid.contexts)}
    assert results["secure"].aborted == [] and results["plain"].participants
    assert results["federated"]["tv"]["examples"] > 0
    # every TV holds a private part, and it moved in training
    assert all(isinstance(c.state.get("fedge.private"), ArrayRecord) for c in grid.contexts.values())
    assert len({v.tobytes() for v in grid.private_versions}) > len(grid.contexts)


def test_every_reply_carries_exactly_its_records_and_keys(
    tv_rounds: tuple[LoopbackGrid, dict[str, Any]],
) -> None:
    grid, results = tv_rounds
    shared = results["shared_keys"]
    assert shared >= TV_SHARED
    for kind, node, reply in grid.log:
        expected = EXPECTED_REPLY[kind]
        assert set(reply.content.keys()) == set(expected), (kind, node)
        for name, keys in expected.items():
            if keys is None:  # a plain contribution: the shared state + its weights, nothing else
                keys = shared | {k + "#weight" for k in shared}
            assert set(reply.content[name].keys()) == keys, (kind, node, name)


def test_no_reply_holds_any_version_of_a_private_part(tv_rounds: tuple[LoopbackGrid, dict[str, Any]]) -> None:
    grid, _ = tv_rounds
    versions = {v.tobytes(): v for v in grid.private_versions}.values()
    assert versions and all(np.count_nonzero(v) == v.size for v in versions)
    leaks = []
    for kind, node, reply in grid.log:
        wire = _wire_bytes(reply)
        for private in versions:
            leaks += [
                f"{kind} from node {node}: {where}" for where in private_leaks(reply.content, wire, private)
            ]
    assert not leaks, leaks


def test_the_leak_detector_finds_a_planted_private_part(
    tv_rounds: tuple[LoopbackGrid, dict[str, Any]],
) -> None:
    """The detector is not blind: each way a private vector could be smuggled out is found."""
    grid, _ = tv_rounds
    private = grid.private_versions[-1]
    plants = {
        "array": RecordDict({"a": ArrayRecord({"u": _array(private)})}),
        "bytes": RecordDict({"c": ConfigRecord({"k": b"x" + private.tobytes()})}),
        "float64 bytes": RecordDict({"c": ConfigRecord({"k": private.astype(np.float64).tobytes()})}),
        "metric list": RecordDict({"m": MetricRecord({"k": [float(v) for v in private]})}),
        "one metric": RecordDict({"m": MetricRecord({"loss": float(private[3])})}),
        "config float": RecordDict({"c": ConfigRecord({"x": float(np.float64(private[0]))})}),
    }
    for name, content in plants.items():
        message = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
        assert private_leaks(content, _wire_bytes(message), private), name


def _array(value: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))
