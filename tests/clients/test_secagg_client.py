"""The device side of secure aggregation through the real ClientApp, in-process.

Three sensor nodes of `smart-home` (partitions 2, 5, 8: watches of tiers low/high/low, so mixed
LoRA ranks) run a whole secure round: `train.secagg_keys` (training + public keys),
`train.secagg_mask` (sealed shares + masked vector), `train.secagg_unmask` (reveals). The test
plays the server with `federation.secagg.protocol.ServerRound`, building every message exactly
as `server/secagg.py` does (same message types, same ConfigRecord keys), and checks what each
reply carries, that the decoded sum is the devices' weighted sum, that the devices forget their
secrets, and that messages from another round or run are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from federation.config import RunConfig
from federation.fleet import device_from_node_config, load_device_data
from federation.model.edge import initial_state, task_slice
from federation.rules import exact_mixed_rank
from federation.rules.base import is_class_row_key
from federation.scenarios import fleet_order, get_scenario
from federation.secagg import quantization_error_bound
from federation.secagg.packing import packed_size, unpack_residues
from federation.secagg.protocol import (
    Expected,
    ParameterError,
    Params,
    Reveal,
    ServerRound,
    device_keys,
    member_ids,
    plan,
)
from federation.secagg.vector import decode_total, vector_length
from server.secagg import KEYS, MASK, UNMASK, _message

RULE = exact_mixed_rank.RULE

RUN_CONFIG: dict[str, Any] = {"scenario": "smart-home", "local-steps": 2}
PARTITIONS = (2, 5, 8)  # smart-home fleet order: phone, tv, sensor, phone, tv, sensor, phone, tv, sensor
RUN_ID = 2**63 + 4242  # a 64-bit Flower run id: the protocol carries it mod 2^63, as the server does
SERVER_ROUND, TASK = 3, "sensor"


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def run() -> RunConfig:
    return RunConfig.parse(RUN_CONFIG)


@pytest.fixture(scope="module")
def global_state(run: RunConfig) -> dict[str, np.ndarray]:
    return initial_state((TASK,), run.lora, run.seed, run)


def _context(partition: int, run_config: dict[str, Any] | None = None) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 40},
        state=RecordDict(),
        run_config=dict(run_config or RUN_CONFIG),
    )


def _plan(run: RunConfig, shapes: dict[str, tuple[int, ...]], n: int, server_round: int = SERVER_ROUND):
    # as server/secagg.py: secure_train_round
    return plan(
        RUN_ID % 2**63,
        server_round,
        TASK,
        n,
        vector_length(RULE, shapes),
        clip=run.secagg_clip,
        value_bits=run.secagg_value_bits,
        max_weight=run.task_max_weight(TASK),
    )


def _expected(run: RunConfig) -> Expected:
    """What the device derives from its own run config (clients/secagg.py: _expected)."""
    return Expected(
        RUN_ID % 2**63,
        TASK,
        run.secagg_clip,
        run.secagg_value_bits,
        run.task_max_weight(TASK),
        run.secagg_min_devices,
    )


def _keys_message(node: int, params: Params, my_id: int, arrays: ArrayRecord) -> Message:
    config = {"server-round": params.server_round, "task": TASK, **params.to_config()}
    config["sa-my-id"] = my_id
    return _message(node, KEYS, config, arrays=arrays)


def _mask_message(node: int, params: Params, peers: dict[int, tuple[bytes, bytes]]) -> Message:
    config = {
        **params.to_config(),
        "server-round": params.server_round,
        "peer-ids": list(peers),
        "peer-c": [peers[j][0] for j in peers],
        "peer-s": [peers[j][1] for j in peers],
    }
    return _message(node, MASK, config)


def _unmask_message(node: int, params: Params, survivors: list[int], sealed: dict[int, bytes]) -> Message:
    config = {
        **params.to_config(),
        "server-round": params.server_round,
        "survivors": survivors,
        "from": list(sealed),
        "sealed": list(sealed.values()),
    }
    return _message(node, UNMASK, config)


def _reveal(reply: Message) -> Reveal:
    record = reply.content["reveal"]
    return Reveal(
        {int(o): bytes(s) for o, s in zip(record["share-owners"], record["shares"], strict=True)},
        {int(j): bytes(s) for j, s in zip(record["pair-ids"], record["pair-seeds"], strict=True)},
        [int(j) for j in record["tampered"]],
    )


def _arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    from server.loop import _record

    return _record(task_slice(state, TASK))  # what RunState.task_record sends


# ------------------------------------------------------------------------------- the whole round


@dataclass
class SecureRound:
    params: Params
    shapes: dict[str, tuple[int, ...]]
    contexts: dict[int, Context]  # node id -> the node's context
    ids: dict[int, int]  # node id -> protocol id
    key_replies: dict[int, Message]
    mask_replies: dict[int, Message]
    unmask_replies: dict[int, Message]
    encoded: dict[int, np.ndarray]  # node id -> its encoded input, read from the device's own state
    state_after_keys: dict[int, set[str]]
    state_after_mask: dict[int, set[str]]
    self_seeds: dict[int, bytes]  # node id -> b, read from the device's own state
    total: np.ndarray
    decoded: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def secure_round(app, run: RunConfig, global_state: dict[str, np.ndarray]) -> SecureRound:
    from clients.secagg import ENCODED, SESSION

    order = fleet_order(get_scenario(RUN_CONFIG["scenario"]))
    assert all(order[p][0] == "sensor" for p in PARTITIONS)
    contexts = {ctx.node_id: ctx for ctx in (_context(p) for p in PARTITIONS)}
    shapes = {k: tuple(v.shape) for k, v in task_slice(global_state, TASK).items()}
    params = _plan(run, shapes, len(contexts))
    ids = member_ids(list(contexts))
    node_of = {pid: node for node, pid in ids.items()}
    server = ServerRound(params)
    arrays = _arrays(global_state)

    # Step 1: the global state and the round's parameters; devices train, reply public keys.
    key_replies, encoded, self_seeds, after_keys = {}, {}, {}, {}
    for node, ctx in contexts.items():
        reply = app(_keys_message(node, params, ids[node], arrays), ctx)
        assert not reply.has_error()
        key_replies[node] = reply
        keys = reply.content["keys"]
        server.add_keys(ids[node], bytes(keys["c-pk"]), bytes(keys["s-pk"]))
        encoded[node] = ctx.state[ENCODED]["x"].numpy().copy()
        self_seeds[node] = bytes(ctx.state[SESSION]["b"])
        after_keys[node] = set(ctx.state.keys())

    # Step 2: neighbours' public keys; devices reply sealed shares and their masked vector.
    mask_replies, after_mask = {}, {}
    for pid in sorted(server.keys):
        node = node_of[pid]
        reply = app(_mask_message(node, params, server.peer_keys_for(pid)), contexts[node])
        assert not reply.has_error()
        mask_replies[node] = reply
        shares = reply.content["shares"]
        sealed = {int(j): bytes(ct) for j, ct in zip(shares["to"], shares["sealed"], strict=True)}
        packed = reply.content["masked"]["y"].numpy()
        server.add_masked(pid, sealed, unpack_residues(packed, params.modulus_bits, params.length))
        after_mask[node] = set(contexts[node].state.keys())

    # Step 3: who survived; survivors reveal.
    survivors = sorted(server.survivors)
    assert survivors == [1, 2, 3] and server.vanished() == set()
    unmask_replies = {}
    for pid in survivors:
        node = node_of[pid]
        msg = _unmask_message(node, params, survivors, server.sealed_for(pid))
        reply = app(msg, contexts[node])
        assert not reply.has_error()
        unmask_replies[node] = reply
        server.add_reveal(pid, _reveal(reply))

    total = server.finish()
    decoded = decode_total(RULE, total, shapes, params)
    return SecureRound(
        params, shapes, contexts, ids, key_replies, mask_replies, unmask_replies, encoded,
        after_keys, after_mask, self_seeds, total, decoded,
    )  # fmt: skip


def test_keys_reply_holds_only_public_keys_and_metrics(secure_round: SecureRound) -> None:
    for reply in secure_round.key_replies.values():
        content = reply.content
        assert set(content.keys()) == {"keys", "metrics"}
        assert len(content.array_records) == 0  # no update, no arrays of any kind
        keys = content["keys"]
        assert isinstance(keys, ConfigRecord) and set(keys.keys()) == {"c-pk", "s-pk"}
        assert all(isinstance(keys[k], bytes) and len(keys[k]) == 32 for k in keys)
        assert keys["c-pk"] != keys["s-pk"]
        metrics = content["metrics"]
        assert isinstance(metrics, MetricRecord)
        assert set(metrics.keys()) == {"server-round", "train_loss", "train_seconds"}  # no num-examples
        assert metrics["server-round"] == SERVER_ROUND
        assert np.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    c_keys = [bytes(r.content["keys"]["c-pk"]) for r in secure_round.key_replies.values()]
    assert len(set(c_keys)) == len(c_keys)  # fresh keys per device


def test_mask_reply_is_one_packed_masked_vector_and_sealed_shares(secure_round: SecureRound) -> None:
    params = secure_round.params
    for node, reply in secure_round.mask_replies.items():
        content = reply.content
        assert set(content.keys()) == {"shares", "masked", "metrics"}
        assert set(content.array_records) == {"masked"}
        masked = content["masked"]
        assert list(masked.keys()) == ["y"]
        packed = masked["y"].numpy()
        # exactly m bits per coordinate on the wire, not a 64-bit word
        assert packed.dtype == np.uint8 and packed.size == packed_size(params.length, params.modulus_bits)
        y = unpack_residues(packed, params.modulus_bits, params.length)
        x = secure_round.encoded[node]
        assert np.mean(y == x) < 0.01  # the masked vector is not the input
        shares = content["shares"]
        assert isinstance(shares, ConfigRecord) and set(shares.keys()) == {"to", "sealed"}
        me = secure_round.ids[node]
        assert sorted(shares["to"]) == sorted(set(secure_round.ids.values()) - {me})
        assert set(content["metrics"].keys()) == {"server-round"}
        assert content["metrics"]["server-round"] == SERVER_ROUND


def test_shares_travel_encrypted(secure_round: SecureRound) -> None:
    """Each Shamir share, as its receiver opened and revealed it in the last step, appears in
    none of the bytes the server relayed in the mask step: a share sent in plaintext (or merely
    wrapped) would be found in its blob."""
    opened = {}  # (sender, receiver) -> the share the receiver opened
    for node, reply in secure_round.unmask_replies.items():
        record = reply.content["reveal"]
        for owner, share in zip(record["share-owners"], record["shares"], strict=True):
            opened[(int(owner), secure_round.ids[node])] = bytes(share)
    assert len(opened) == 6  # 3 devices, 2 neighbours each
    for node, reply in secure_round.mask_replies.items():
        me, shares = secure_round.ids[node], reply.content["shares"]
        for receiver, blob in zip(shares["to"], shares["sealed"], strict=True):
            plain = opened[(me, int(receiver))]
            assert len(plain) >= 4 + 66  # a real share: length header + one field element
            assert plain not in bytes(blob) and plain[4:20] not in bytes(blob)


def test_secure_sum_is_exactly_the_devices_encoded_sum(secure_round: SecureRound) -> None:
    plain = np.zeros(secure_round.params.length, dtype=np.uint64)
    for x in secure_round.encoded.values():
        plain += x
    plain &= np.uint64(2**secure_round.params.modulus_bits - 1)
    np.testing.assert_array_equal(secure_round.total, plain)


def test_decoded_sum_matches_local_training(
    secure_round: SecureRound, run: RunConfig, global_state: dict[str, np.ndarray]
) -> None:
    """The decoded sum is sum_k w_k delta_k (within the quantization bound) and sum_k w_k exactly."""
    from federation.local import local_train

    shared = task_slice(global_state, TASK)
    expected: dict[str, np.ndarray] = {}
    weights, ranks, lacking = [], [], 0
    for ctx in secure_round.contexts.values():
        device = device_from_node_config(ctx.node_config, run.scenario, run.seed, run.cache_dir)
        data = load_device_data(device, run.seed, run.seq_len, run.cache_dir)
        result = local_train(run, device, data, shared, SERVER_ROUND)
        weight = int(result.metrics["num-examples"])
        weights.append(weight)
        ranks.append(result.rank)
        assert result.classes is not None
        lacking += int(not result.classes.all())
        contrib = exact_mixed_rank.contribution(result.delta, float(weight), result.rank, result.classes)
        for key, value in contrib.items():
            if key.endswith(exact_mixed_rank.WEIGHT):
                add = value.astype(np.float64)
            else:
                clipped = np.clip(result.delta[key].astype(np.float64), -run.secagg_clip, run.secagg_clip)
                if is_class_row_key(key):  # each class row: the weight behind it (0: a class it lacks)
                    behind = contrib[key + exact_mixed_rank.WEIGHT].astype(np.float64)
                    add = clipped * behind.reshape((-1,) + (1,) * (clipped.ndim - 1))
                else:
                    add = clipped * weight
            expected[key] = expected.get(key, 0) + add
    assert len(set(ranks)) > 1  # low and high tier watches: a mixed-rank round
    assert lacking > 0  # a watch lacking some exercises: class rows weighed per class
    decoded = secure_round.decoded
    assert set(decoded) == set(expected)
    bound = quantization_error_bound(
        run.secagg_clip, run.secagg_value_bits, len(weights), max_weight=max(weights)
    )
    for key, value in decoded.items():
        if key.endswith(exact_mixed_rank.WEIGHT):
            np.testing.assert_array_equal(value, expected[key], err_msg=key)
        else:
            assert np.max(np.abs(value - expected[key])) <= bound, key
    trained = [np.abs(decoded[k]).max() for k in secure_round.shapes if exact_mixed_rank.is_column_key(k)]
    assert all(m > 0 for m in trained)  # a real LoRA update went through


def test_devices_forget_their_secrets(secure_round: SecureRound) -> None:
    from clients.secagg import ENCODED, SESSION

    for node, ctx in secure_round.contexts.items():
        assert {SESSION, ENCODED} <= secure_round.state_after_keys[node]
        assert SESSION in secure_round.state_after_mask[node]
        assert ENCODED not in secure_round.state_after_mask[node]  # only the masked vector exists
        assert SESSION not in ctx.state and ENCODED not in ctx.state  # after unmask: all gone
        for reply in secure_round.unmask_replies.values():
            record = reply.content["reveal"]
            assert set(record.keys()) == {"share-owners", "shares", "pair-ids", "pair-seeds", "tampered"}
            assert list(record["pair-ids"]) == [] and list(record["tampered"]) == []


# --------------------------------------------------------------- other rounds, other runs, dropout


def test_messages_from_another_round_or_run_are_refused(
    app, run: RunConfig, global_state: dict[str, np.ndarray]
) -> None:
    from clients.secagg import ENCODED, SESSION

    ctx = _context(PARTITIONS[0])
    shapes = {k: tuple(v.shape) for k, v in task_slice(global_state, TASK).items()}
    params = _plan(run, shapes, 3)
    reply = app(_keys_message(ctx.node_id, params, 1, _arrays(global_state)), ctx)
    assert not reply.has_error()
    # the two other members, played here by the protocol functions themselves
    others = {i: device_keys(params, i, _expected(run)) for i in (2, 3)}
    peers = {i: (c_pk, s_pk) for i, (_, c_pk, s_pk) in others.items()}

    next_round = dataclasses.replace(params, server_round=SERVER_ROUND + 1)
    other_run = dataclasses.replace(params, run_id=(RUN_ID + 1) % 2**63)
    with pytest.raises(ValueError, match="does not belong to this device's round"):
        app(_mask_message(ctx.node_id, next_round, peers), ctx)
    with pytest.raises(ValueError, match="secure-aggregation message for run"):
        app(_mask_message(ctx.node_id, other_run, peers), ctx)
    # a fresh plan of the same round (another graph seed) is another round's session too
    with pytest.raises(ValueError, match="does not belong to this device's round"):
        app(_mask_message(ctx.node_id, _plan(run, shapes, 3), peers), ctx)
    assert {SESSION, ENCODED} <= set(ctx.state.keys())  # refusals consumed nothing

    reply = app(_mask_message(ctx.node_id, params, peers), ctx)
    assert not reply.has_error()
    for stale, why in ((next_round, "does not belong"), (other_run, "message for run")):
        with pytest.raises(ValueError, match=why):
            app(_unmask_message(ctx.node_id, stale, [1, 2, 3], {}), ctx)
    assert SESSION in ctx.state
    # a lying server: fake ids, or "all your neighbours vanished" (issue attack 1)
    for lie, why in (([1, 98, 99], "not members of this group"), ([1], "below the threshold")):
        with pytest.raises(ParameterError, match=why):
            app(_unmask_message(ctx.node_id, params, lie, {}), ctx)
    assert SESSION in ctx.state  # refused, nothing revealed, still able to answer the truth
    reply = app(_unmask_message(ctx.node_id, params, [1, 2, 3], {}), ctx)
    assert not reply.has_error() and SESSION not in ctx.state
    assert list(reply.content["reveal"]["pair-ids"]) == []
    with pytest.raises(ParameterError, match="no secure-aggregation session"):  # and never twice
        app(_unmask_message(ctx.node_id, params, [1, 2], {}), ctx)


def test_downgraded_parameters_are_refused_before_training(
    app, run: RunConfig, global_state: dict[str, np.ndarray]
) -> None:
    from clients.secagg import ENCODED, SESSION

    ctx = _context(PARTITIONS[2])
    shapes = {k: tuple(v.shape) for k, v in task_slice(global_state, TASK).items()}
    params = _plan(run, shapes, 4)
    for change, why in (
        ({"threshold": 1}, "threshold 1 is outside"),
        ({"n": 2, "degree": 1, "threshold": 1}, "below secagg-min-devices"),
        ({"modulus_bits": 63}, "no-wrap modulus"),
        ({"max_weight": 10**6}, "differ from this device's"),
    ):
        bad = dataclasses.replace(params, **change)  # type: ignore[arg-type]
        with pytest.raises(ParameterError, match=why):
            app(_keys_message(ctx.node_id, bad, 1, _arrays(global_state)), ctx)
        assert SESSION not in ctx.state and ENCODED not in ctx.state  # no keys drawn, nothing trained
    reply = app(_keys_message(ctx.node_id, params, 1, _arrays(global_state)), ctx)
    assert not reply.has_error() and SESSION in ctx.state


def test_simulated_dropout_after_keys(app, run: RunConfig, global_state: dict[str, np.ndarray]) -> None:
    from clients.secagg import ENCODED, SESSION

    ctx = _context(PARTITIONS[1], {**RUN_CONFIG, "dropout-after-keys": 1.0})
    shapes = {k: tuple(v.shape) for k, v in task_slice(global_state, TASK).items()}
    params = _plan(run, shapes, 3)
    reply = app(_keys_message(ctx.node_id, params, 2, _arrays(global_state)), ctx)
    assert not reply.has_error() and set(reply.content["keys"].keys()) == {"c-pk", "s-pk"}
    peers = {i: device_keys(params, i, _expected(run))[1:] for i in (1, 3)}
    with pytest.raises(RuntimeError, match="simulated dropout"):
        app(_mask_message(ctx.node_id, params, peers), ctx)
    assert SESSION not in ctx.state and ENCODED not in ctx.state  # a vanished device keeps nothing
