"""fedge's ClientApp called in-process with real Flower Messages (no Ray, no SuperLink).

A sensor node (cheap) and a TV node (MiniLM + private part) of the `smoke` scenario go through
check-in, train and evaluate, exactly as the ServerApp would address them. The server's side of
each message (global state, config) is built by the real `federation` code. A plain round's
reply carries the device's *contribution* (weighted delta + `KEY#weight`), at the device's
LoRA rank: the smoke fleet's first sensor is a low-tier watch (rank 2), its first TV a mid-tier
one (rank 4), both below the model's r_max = 8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from federation.config import RunConfig
from federation.data.sensor import N_CLASSES
from federation.fleet import device_for_partition, load_device_data
from federation.model.edge import initial_state, task_slice
from federation.rules import exact_mixed_rank
from federation.rules.base import is_class_row_key
from federation.rules.exact_mixed_rank import WEIGHT, is_column_key
from federation.scenarios import get_scenario
from federation.training import AUC_BINS

RUN_CONFIG = {"scenario": "smoke", "local-steps": 2}
PHONE_PARTITION, TV_PARTITION, SENSOR_PARTITION = 0, 1, 2  # smoke order: phone, tv, sensor, phone, ...


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def run() -> RunConfig:
    return RunConfig.parse(RUN_CONFIG)


@pytest.fixture(scope="module")
def global_state(run: RunConfig) -> dict[str, np.ndarray]:
    """The server's round-0 state of every smoke task (MiniLM is read once, for phone + tv)."""
    return initial_state(run.scenario.tasks, run.lora, run.seed, run)


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 8},
        state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )


@pytest.fixture(scope="module")
def sensor_ctx() -> Context:
    return _context(SENSOR_PARTITION)


@pytest.fixture(scope="module")
def tv_ctx() -> Context:
    return _context(TV_PARTITION)


def _message(ctx: Context, kind: str, content: RecordDict) -> Message:
    return Message(content, dst_node_id=ctx.node_id, message_type=kind)


def _work(ctx: Context, kind: str, state: dict[str, np.ndarray], task: str, server_round: int) -> Message:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in task_slice(state, task).items()})
    config = ConfigRecord({"server-round": server_round, "task": task})
    return _message(ctx, kind, RecordDict({"arrays": arrays, "config": config}))


def _checkin(app: Any, ctx: Context) -> Message:
    msg = _message(ctx, MessageType.QUERY, RecordDict({"config": ConfigRecord({"check-in": 1})}))
    return app(msg, ctx)


def _check_train_reply(
    reply: Message,
    state: dict[str, np.ndarray],
    task: str,
    server_round: int,
    rank: int,
    held: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Check a train reply's contribution; return the device's delta (contribution / weight).
    `held`: the classes the device holds (its head's class rows carry its weight on those only)."""
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    expected = task_slice(state, task)
    upload = {k: v.numpy() for k, v in arrays.items()}
    assert set(upload) == set(expected) | {k + WEIGHT for k in expected}
    weight = metrics["num-examples"]
    assert weight > 0
    delta = {}
    for key, shape in ((k, v.shape) for k, v in expected.items()):
        value, weights = upload[key], upload[key + WEIGHT]
        assert value.shape == shape and value.dtype == np.float32, key
        assert weights.dtype == np.float32 and np.isfinite(value).all(), key
        if is_column_key(key):  # the device's rank: weight on B's first `rank` columns, zeros beyond
            assert weights.tolist() == [weight] * rank + [0.0] * (shape[1] - rank), key
            assert not value[:, rank:].any(), key
        elif is_class_row_key(key):  # its weight on the classes it holds; the others' rows not sent
            assert held is not None and weights.tolist() == [weight if h else 0.0 for h in held], key
            assert not value[~held].any() and value[held].any(), key
        else:
            assert weights.tolist() == [weight], key
        delta[key] = value / weight
    trained = [np.abs(v[:, :rank]).max() for k, v in delta.items() if is_column_key(k)]
    assert trained and all(m > 0 for m in trained), "no LoRA update"
    assert metrics["server-round"] == server_round
    assert metrics["upload-bytes"] == arrays.count_bytes() > 0
    assert np.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    # what the server checks before aggregating
    shapes = {k: v.shape for k, v in expected.items()}
    run = RunConfig.parse(RUN_CONFIG)
    assert exact_mixed_rank.validate_contribution(upload, shapes, run.max_weight) is None
    return delta


# -------------------------------------------------------------------------------------- sensor


def test_sensor_checkin(app, sensor_ctx: Context, run: RunConfig) -> None:
    reply = _checkin(app, sensor_ctx)
    assert not reply.has_error()
    device = device_for_partition(get_scenario("smoke"), SENSOR_PARTITION, run.seed)
    info = reply.content["device"]
    assert dict(info) == {
        "device-class": "sensor",
        "task": "sensor",
        "data-client": device.data_client,
        "tier": "low",
        "rank": 2,
    }
    assert (device.tier, device.rank) == ("low", 2)
    # nothing about the data leaves at check-in: no sizes, no metrics
    assert set(reply.content.keys()) == {"device"}


def test_sensor_train(app, sensor_ctx: Context, global_state: dict[str, np.ndarray], run: RunConfig) -> None:
    reply = app(_work(sensor_ctx, MessageType.TRAIN, global_state, "sensor", 3), sensor_ctx)
    device = device_for_partition(get_scenario("smoke"), SENSOR_PARTITION, run.seed)
    labels = load_device_data(device, run.seed, run.seq_len).train_y.numpy()
    held = np.bincount(labels, minlength=N_CLASSES) > 0
    assert 0 < held.sum() < N_CLASSES  # the watch lacks some exercises: their rows must stay home
    delta = _check_train_reply(reply, global_state, "sensor", 3, rank=2, held=held)
    assert set(delta) == {
        "lora.conv2.lora_B.weight",
        "lora.conv3.lora_B.weight",
        "lora.proj.lora_B.weight",
        "head.norm.weight",
        "head.norm.bias",
        "head.classes.weight",
        "head.classes.bias",
    }
    # 2 local steps of batch 8: the low-tier watch's memory budget caps the run's batch of 16
    assert run.train.batch_size == 16
    assert reply.content["metrics"]["num-examples"] == run.train.steps * 8 == 16
    assert "fedge.private" not in sensor_ctx.state  # a sensor has no private part


def test_sensor_evaluate_returns_sums(
    app, sensor_ctx: Context, global_state: dict[str, np.ndarray], run
) -> None:
    reply = app(_work(sensor_ctx, MessageType.EVALUATE, global_state, "sensor", 4), sensor_ctx)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    device = device_for_partition(get_scenario("smoke"), SENSOR_PARTITION, run.seed)
    n_test = len(load_device_data(device, run.seed, run.seq_len).test_y)
    assert metrics["count"] == metrics["num-examples"] == n_test > 0
    assert metrics["server-round"] == 4
    confusion = metrics["confusion"]
    assert len(confusion) == N_CLASSES**2 and sum(confusion) == n_test
    assert metrics["correct"] == sum(confusion[i * N_CLASSES + i] for i in range(N_CLASSES))
    assert metrics["loss_sum"] > 0 and np.isfinite(metrics["loss_sum"])


def test_wrong_task_is_refused(app, sensor_ctx: Context, global_state: dict[str, np.ndarray]) -> None:
    # In-process the handler's exception propagates (a SuperNode's runtime would turn it into an
    # error reply); nothing is trained on another task's state.
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        with pytest.raises(ValueError, match="server sent task 'phone' to a sensor device"):
            app(_work(sensor_ctx, kind, global_state, "phone", 1), sensor_ctx)


# --------------------------------------------------------------------------------------- phone


def test_phone_trains_at_its_rank_and_weighs_sequences(
    app, global_state: dict[str, np.ndarray], run: RunConfig
) -> None:
    ctx = _context(PHONE_PARTITION)  # the smoke fleet's first phone: tier low, rank 2
    reply = app(_work(ctx, MessageType.TRAIN, global_state, "phone", 1), ctx)
    delta = _check_train_reply(reply, global_state, "phone", 1, rank=2)
    assert sum(is_column_key(k) for k in delta) == 12  # 6 layers x (query, value)
    # the weight is the sequences trained on (steps x batch), not the tokens; a low-tier
    # phone's memory budget allows a batch of 4
    assert reply.content["metrics"]["num-examples"] == run.train.steps * 4 == 8


# ------------------------------------------------------------------------------------------ tv


def test_tv_checkin_train_keeps_private_part_and_evaluates(
    app, tv_ctx: Context, global_state: dict[str, np.ndarray], run: RunConfig
) -> None:
    from clients.client_app import PRIVATE_KEY

    reply = _checkin(app, tv_ctx)
    assert not reply.has_error()
    assert reply.content["device"]["device-class"] == "tv" and reply.content["device"]["task"] == "tv"
    assert reply.content["device"]["tier"] == "mid" and reply.content["device"]["rank"] == 4
    assert "metrics" not in reply.content

    assert PRIVATE_KEY not in tv_ctx.state
    reply = app(_work(tv_ctx, MessageType.TRAIN, global_state, "tv", 1), tv_ctx)
    delta = _check_train_reply(reply, global_state, "tv", 1, rank=4)
    assert set(delta) == set(task_slice(global_state, "tv"))
    assert {"head.item.weight", "head.item.bias", "head.global_bias"} <= set(delta)

    # the viewer's part stays on the device: in context.state, not in the reply
    stored = tv_ctx.state[PRIVATE_KEY]
    assert isinstance(stored, ArrayRecord)
    private = stored["user"].numpy()
    assert private.shape == (run.tv_user_dim + 1,) and np.isfinite(private).all()
    # (that no reply of any handler carries it is tests/clients/test_tv_privacy.py's)
    assert reply.content["arrays"].count_bytes() == reply.content["metrics"]["upload-bytes"]

    # the next round starts from the stored part and moves it on
    reply = app(_work(tv_ctx, MessageType.TRAIN, global_state, "tv", 2), tv_ctx)
    _check_train_reply(reply, global_state, "tv", 2, rank=4)
    again = tv_ctx.state[PRIVATE_KEY]["user"].numpy()
    assert again.shape == private.shape and not np.array_equal(again, private)

    reply = app(_work(tv_ctx, MessageType.EVALUATE, global_state, "tv", 2), tv_ctx)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["count"] == metrics["num-examples"] > 0 and metrics["server-round"] == 2
    pos, neg = metrics["pos_hist"], metrics["neg_hist"]
    assert len(pos) == len(neg) == AUC_BINS
    assert sum(pos) + sum(neg) == metrics["count"]
    assert 0 <= metrics["correct"] <= metrics["count"]
    assert metrics["loss_sum"] > 0 and np.isfinite(metrics["loss_sum"])
