"""The server's secure round (`server/secagg.py`) without Ray: a Grid that answers like devices.

`DeviceGrid` is a `flwr.serverapp.Grid` whose nodes are fedge's real ClientApp handlers,
called in-process with one `Context` per node (the `dropout-check` fleet: 10 watches in one
group, complete graph k = 9, threshold t = 5). Replies pass through optional hooks that play
the network or a hostile device: drop a reply (a device that vanished), rewrite it (a hostile
device, a replay), before the server's real `RunState.train_round` reads it. Every round here
is therefore the production code on both sides; only the transport is in memory.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid

from federation.config import RunConfig
from federation.secagg import pki
from federation.secagg.packing import pack_residues, unpack_residues
from server.loop import RunState, check_in, sample
from server.secagg import CHECK, KEYS, MASK, UNMASK, secure_train_round

RUN_ID = 2**63 + 77  # a 64-bit Flower run id; the protocol carries it mod 2^63
Hook = Callable[[Message, Message], Message | None]  # (request, reply) -> reply, or None: dropped

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class DeviceGrid(Grid):
    """An in-memory Grid: pushing stores messages, pulling runs the real ClientApp on them."""

    def __init__(self, app: Any, contexts: dict[int, Context]) -> None:
        self.app, self.contexts = app, contexts
        self.pending: dict[str, Message] = {}
        self.hooks: list[Hook] = []
        self.request_hooks: list[Callable[[Message], Message]] = []  # a lying server, on the wire
        self.sent: list[Message] = []
        self.silent: set[int] = set()  # nodes Flower lists that never answer (died without a word)

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used by the loop
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - not used by the loop
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts) + sorted(self.silent)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pending[msg.metadata.message_id] = msg
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterator[Message]:
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is None:
                continue
            if msg.metadata.dst_node_id in self.silent:
                self.pending[mid] = msg  # never answered
                continue
            delivered = msg
            for rewrite in self.request_hooks:
                delivered = rewrite(delivered)
            try:
                reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # what a SuperNode reports when its ClientApp raises
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            for hook in self.hooks:
                reply = hook(msg, reply) if reply is not None else None
            if reply is None:  # the device vanished: the SuperLink answers for it, as Flower does,
                # with an error whose source is the SuperLink (node 1), not the lost node
                reply = create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
            yield reply


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _federation(app: Any, tmp: Path, cache_dir: Path, **extra: Any) -> tuple[RunState, DeviceGrid]:
    config = {"scenario": "dropout-check", "local-steps": 2, "out-dir": str(tmp / "out"),
              "cache-dir": str(cache_dir), "federated-eval-every": -1, **extra}  # fmt: skip
    contexts = {
        5000 + p: Context(
            run_id=RUN_ID,
            node_id=5000 + p,
            node_config={"partition-id": p, "num-partitions": 10},
            state=RecordDict(),
            run_config=dict(config),
        )
        for p in range(10)
    }
    grid = DeviceGrid(app, contexts)
    fed = RunState(grid, RunConfig.parse(config), RUN_ID)
    check_in(grid, fed.registry, list(contexts), 60.0)
    assert len(fed.registry.nodes) == 10
    return fed, grid


def _snapshot(fed: RunState) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in fed.state.items()}


def _unchanged(fed: RunState, before: dict[str, np.ndarray]) -> bool:
    return set(fed.state) == set(before) and all(np.array_equal(fed.state[k], before[k]) for k in before)


def _on(stage: str, nodes: set[int], action: Callable[[Message], Message | None]) -> Hook:
    def hook(request: Message, reply: Message) -> Message | None:
        if request.metadata.message_type == stage and request.metadata.dst_node_id in nodes:
            return action(reply)
        return reply

    return hook


def test_secure_round_completes_through_the_real_handlers(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    before = _snapshot(fed)
    stats = fed.train_round(1)
    assert stats.secure and stats.aborted == [] and stats.participants == {"sensor": 10}
    assert not _unchanged(fed, before)  # the secure sum was applied
    types = {m.metadata.message_type for m in grid.sent}
    assert types == {KEYS, MASK, UNMASK, "query"}  # three exchanges without certified keys
    assert "secure sum of 10 devices" in log_lines.text()
    # uploads are packed to m bits: at most 1.25x a float32 contribution of the same layout
    per_device = stats.upload_bytes / 10
    floats = 4 * sum(int(np.prod(s)) for s in _contribution_shapes(fed).values())
    assert per_device <= 1.25 * floats


def _contribution_shapes(fed: RunState) -> dict[str, tuple[int, ...]]:
    from federation.rules.exact_mixed_rank import expected_shapes

    return expected_shapes(fed.task_shapes("sensor"))


def test_a_task_below_secagg_min_devices_sits_out_and_nothing_changes(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir, **{"secagg-min-devices": 4})
    before = _snapshot(fed)
    stats = secure_train_round(fed, 1, sorted(fed.registry.nodes)[:3])
    assert stats.participants == {} and grid.sent[-1].metadata.message_type == "query"  # none sent
    assert _unchanged(fed, before)
    assert "only 3 sensor devices, secure aggregation needs 4; sensor sits out" in log_lines.text()


def test_survivors_between_one_and_the_threshold_abort_and_the_next_round_runs(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    nodes = sorted(fed.registry.nodes)
    grid.hooks.append(_on(MASK, set(nodes[:6]), lambda reply: None))  # 6 of 10 vanish: 4 < t = 5
    before = _snapshot(fed)
    stats = fed.train_round(1)
    assert stats.aborted == ["sensor"] and stats.vanished == 6 and stats.participants == {}
    assert _unchanged(fed, before)
    text = log_lines.text()
    assert "below the threshold 5" in text  # each survivor refused to reveal anything
    assert "sensor update aborted, global sensor model unchanged: 4 devices sent masked vectors" in text
    grid.hooks.clear()
    assert fed.train_round(2).participants == {"sensor": 10} and not _unchanged(fed, before)


def test_a_late_node_checks_in_at_the_next_round_and_a_silent_one_is_asked_once(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    """A node that connects after the start's check-in (slow to boot, or restarted under a new id)
    is asked who it is when the next round picks its devices, and is drawn from then on; a node
    Flower lists that never answers is asked once, not every round (each ask waits the timeout)."""
    fed, grid = _federation(app, tmp_path, cache_dir, **{"round-timeout": 2.0})
    late = 5003
    client = fed.registry.nodes.pop(late).data_client  # as if it had connected after the start
    grid.silent = {7777}
    assert late in fed.candidates(1) and 7777 not in fed.candidates(1)
    assert fed.registry.nodes[late].data_client == client
    assert late in sample(fed.registry, {"sensor": 10}, 0, 1)
    fed.candidates(2)
    asked = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert asked.count(7777) == 1 and asked.count(late) == 2  # (the start's check-in, then once)
    assert "1 node(s) never answered check-in within 2 s: [7777]" in log_lines.text()


def test_a_lost_node_is_charged_to_the_node_not_to_the_superlink_that_answers_for_it(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    """Flower answers for a dead node with an error from the SuperLink (node 1): the server maps
    the reply back to the node it asked, counts a training failure, and the round goes on."""
    fed, grid = _federation(app, tmp_path, cache_dir)
    nodes = sorted(fed.registry.nodes)
    grid.hooks.append(_on(KEYS, {nodes[0]}, lambda reply: None))  # dies while training
    grid.hooks.append(_on(MASK, {nodes[1]}, lambda reply: None))  # dies after sending its keys
    stats = fed.train_round(1)
    assert stats.failures == 1 and stats.vanished == 1 and stats.aborted == []
    assert stats.participants == {"sensor": 8}
    text = log_lines.text()
    assert f"node {nodes[0]} failed in round 1" in text and "in no group" not in text


def test_replies_from_another_round_are_left_out(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    nodes = sorted(fed.registry.nodes)
    kept: dict[int, Message] = {}

    def keep(reply: Message) -> Message:
        kept[reply.metadata.src_node_id] = reply
        return reply

    grid.hooks.append(_on(MASK, {nodes[0]}, keep))
    fed.train_round(1)
    grid.hooks.clear()

    def replay(reply: Message) -> Message:  # node 0's round-1 masked vector, as its round-2 answer
        old = kept[nodes[0]]
        return Message(RecordDict(dict(old.content.items())), reply_to=_request_of(grid, reply))

    grid.hooks.append(_on(MASK, {nodes[0]}, replay))
    before = _snapshot(fed)
    stats = fed.train_round(2)
    assert stats.aborted == [] and stats.participants == {"sensor": 9} and stats.vanished == 1
    assert not _unchanged(fed, before)
    assert (
        f"node {nodes[0]} failed in round 2 (mask: vanished after sharing keys): reply for another round"
        in (log_lines.text())
    )


def _request_of(grid: DeviceGrid, reply: Message) -> Message:
    return next(m for m in grid.sent if m.metadata.message_id == reply.metadata.reply_to_message_id)


def _hostile_vector(fed: RunState, grid: DeviceGrid) -> Callable[[Message], Message]:
    """A device that adds 2^(m-3) to the first coordinate of its masked vector (as adding it to
    its input: masking is additive), far beyond clip x max-weight."""

    def act(reply: Message) -> Message:
        request = _request_of(grid, reply)
        m, length = (
            int(request.content["config"]["sa-modulus-bits"]),
            int(request.content["config"]["sa-length"]),
        )
        y = unpack_residues(reply.content["masked"]["y"].numpy(), m, length)
        y[0] = (y[0] + np.uint64(1 << (m - 3))) & np.uint64((1 << m) - 1)
        reply.content["masked"] = ArrayRecord({"y": Array(pack_residues(y, m))})
        return reply

    return act


def test_a_hostile_device_aborts_its_group_naming_the_check_and_nothing_changes(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    hostile = sorted(fed.registry.nodes)[3]
    grid.hooks.append(_on(MASK, {hostile}, _hostile_vector(fed, grid)))
    before = _snapshot(fed)
    stats = fed.train_round(1)
    assert stats.aborted == ["sensor"] and _unchanged(fed, before)
    assert "exceeds clip x its weight" in log_lines.text() and "(value-bound)" in log_lines.text()
    grid.hooks.clear()
    assert fed.train_round(2).aborted == [] and not _unchanged(fed, before)  # honest rounds run on


def test_a_low_order_key_is_refused_and_blamed_on_its_sender(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    bad = sorted(fed.registry.nodes)[5]

    def zero_key(reply: Message) -> Message:
        reply.content["keys"]["c-pk"] = bytes(32)
        return reply

    grid.hooks.append(_on(KEYS, {bad}, zero_key))
    stats = fed.train_round(1)
    assert stats.aborted == [] and stats.rejected == 1 and stats.participants == {"sensor": 9}
    text = log_lines.text()
    assert f"node {bad}'s keys reply rejected in round 1: invalid X25519 public key" in text
    assert "failed in round 1 (mask" not in text  # no honest neighbour failed because of it


def test_a_garbage_share_is_blamed_on_its_sender_and_the_round_completes(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    sender = sorted(fed.registry.nodes)[2]

    def garble(reply: Message) -> Message:
        sealed = list(reply.content["shares"]["sealed"])
        sealed[0] = bytes(sealed[0][:-1]) + bytes([sealed[0][-1] ^ 1])
        reply.content["shares"]["sealed"] = sealed
        return reply

    grid.hooks.append(_on(MASK, {sender}, garble))
    stats = fed.train_round(1)
    assert stats.aborted == [] and stats.participants == {"sensor": 10}
    assert f"node {sender} sent device" in log_lines.text() and "fails authentication" in log_lines.text()


def test_certified_round_runs_the_consistency_check_and_refuses_unsigned_keys(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    root = pki.create_fleet_pki(tmp_path / "pki", [pki.device_name_for(p) for p in range(10)])
    fed, grid = _federation(app, tmp_path, cache_dir, **{"secagg-pki": str(root)})
    unsigned = sorted(fed.registry.nodes)[1]

    def strip(reply: Message) -> Message:
        reply.content["keys"]["sig"] = bytes(64)
        return reply

    grid.hooks.append(_on(KEYS, {unsigned}, strip))
    before = _snapshot(fed)
    stats = fed.train_round(1)
    assert stats.aborted == [] and stats.participants == {"sensor": 9} and stats.rejected == 1
    assert not _unchanged(fed, before)
    assert {m.metadata.message_type for m in grid.sent} >= {KEYS, MASK, CHECK, UNMASK}
    assert "check" in stats.secagg_stage_seconds
    assert f"node {unsigned}'s keys reply rejected in round 1: round keys are not signed" in log_lines.text()


def _rewrite(stage: str, nodes: set[int], **config: Any) -> Callable[[Message], Message]:
    """A lying server: the request to `nodes` at `stage` carries other config values."""

    def rewrite(msg: Message) -> Message:
        if msg.metadata.message_type == stage and msg.metadata.dst_node_id in nodes:
            for key, value in config.items():
                msg.content["config"][key] = value(msg) if callable(value) else value
        return msg

    return rewrite


def test_a_lying_server_is_refused_by_the_real_handlers_and_honest_rounds_run_on(
    app: Any, tmp_path: Path, cache_dir: Path, log_lines: LogLines
) -> None:
    fed, grid = _federation(app, tmp_path, cache_dir)
    nodes = sorted(fed.registry.nodes)
    # round 1: a downgrade to threshold 1 for every device: none trains, none sends keys
    grid.request_hooks.append(_rewrite(KEYS, set(nodes), **{"sa-threshold": 1}))
    before = _snapshot(fed)
    stats = fed.train_round(1)
    assert stats.aborted == ["sensor"] and stats.failures == 10 and _unchanged(fed, before)
    assert "refusing secure-aggregation parameters: threshold 1 is outside" in log_lines.text()
    # round 2: the target is told "survivors: you and two ids that do not exist" (issue attack 1)
    target = nodes[4]  # protocol id 5: ids follow sorted node ids
    grid.request_hooks[:] = [_rewrite(UNMASK, {target}, survivors=[5, 98, 99])]
    stats = fed.train_round(2)
    assert f"node {target} failed in round 2 (unmask)" in log_lines.text()
    assert "not members of this group" in log_lines.text()
    # the others revealed honestly: the round completes, with the target's vector in the sum
    assert stats.aborted == [] and stats.participants == {"sensor": 10} and not _unchanged(fed, before)


# ------------------------------------------------------------- one round, typed: plain vs secure


def test_plain_and_secure_rounds_return_the_same_typed_result_and_only_the_loop_applies_it(
    app: Any, tmp_path: Path, cache_dir: Path
) -> None:
    """The same 10 watches, the same global state and round: a plain round and a secure round
    return one `RoundResult` type whose fields agree (who took part, failures, losses, and the
    aggregate, up to the fixed-point quantum), neither path touches the global state, and
    `train_round` applies the aggregate through the run's rule."""
    import json

    from federation.secagg import quantization_error_bound
    from server.round import MetricsEntry, RoundResult

    plain_fed, _ = _federation(app, tmp_path / "plain", cache_dir, **{"secure-aggregation": False})
    secure_fed, _ = _federation(app, tmp_path / "secure", cache_dir)
    nodes = sorted(plain_fed.registry.nodes)
    before = _snapshot(plain_fed)
    plain = plain_fed.plain_train_round(1, nodes)
    secure = secure_train_round(secure_fed, 1, nodes)
    assert type(plain) is type(secure) is RoundResult
    assert _unchanged(plain_fed, before) and _unchanged(secure_fed, before)  # no path applies itself
    assert (plain.secure, secure.secure) == (False, True)
    for name in ("sampled", "participants", "failures", "rejected", "vanished", "aborted"):
        assert getattr(plain, name) == getattr(secure, name), name
    assert plain.participants == {"sensor": 10} and plain.sampled == 10
    assert plain.train_loss.keys() == secure.train_loss.keys() == {"sensor"}
    assert plain.train_loss["sensor"] == pytest.approx(secure.train_loss["sensor"], rel=1e-9)
    assert plain.download_bytes == secure.download_bytes > 0 and plain.upload_bytes > 0 < secure.upload_bytes
    assert secure.secagg_stage_seconds.keys() == {"keys+train", "mask", "unmask", "reconstruct+decode"}

    rule = plain_fed.run.rule
    plain_mean, secure_mean = rule.finalize(plain.aggregate), rule.finalize(secure.aggregate)
    assert plain_mean.keys() == secure_mean.keys() and plain_mean
    bound = quantization_error_bound(1.0, 24, 1)  # a weighted mean is off by < 1 quantum
    for key in plain_mean:
        np.testing.assert_allclose(secure_mean[key], plain_mean[key], rtol=0, atol=bound)
    # the watches hold different exercises: each class row is divided by its own weight
    for key in ("sensor/head.classes.weight", "sensor/head.classes.bias"):
        sums, weights = secure.aggregate.sums[key], secure.aggregate.sums[key + "#weight"]
        assert len(set(weights.tolist())) > 1, key  # a per-class profile, not one weight
        rows = np.flatnonzero(weights > 0)
        np.testing.assert_allclose(secure_mean[key][rows], (sums[rows].T / weights[rows]).T, rtol=1e-12)

    # metrics.jsonl is serialised from the type: the same fields for both paths, plain JSON
    lines = [MetricsEntry(1, {}, {}, 1.0, train=r).to_json() for r in (plain, secure)]
    assert lines[0].keys() == lines[1].keys() and "aggregate" not in lines[0]
    assert json.loads(json.dumps(lines[1]))["participants"] == {"sensor": 10}

    applied = plain_fed.train_round(1)  # the loop: the same round again, now applied
    assert not _unchanged(plain_fed, before)
    expected = rule.update(before, rule.finalize(applied.aggregate), 1.0)
    assert all(np.array_equal(plain_fed.state[k], expected[k]) for k in expected)
