"""The server's gate in front of aggregation: `Federation._check_reply` on real Flower replies.

`Federation` takes its Grid only to send messages; the check needs none, so a real `Federation`
of the smoke scenario is built with `grid=None` (its global state and shapes are the real ones).
Replies are built as the ClientApp builds them: `Message(RecordDict(...), reply_to=request)`;
one comes from the real ClientApp itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from federation.config import RunConfig
from federation.model.edge import task_slice
from server.loop import Federation

ROUND = 3
RUN_CONFIG = {"scenario": "smoke", "local-steps": 2}


@pytest.fixture(scope="module", autouse=True)
def _task_identity():
    # Building a Message outside a Flower runtime needs this (internal API; FLOWER-1.42-NOTES §8).
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    out = tmp_path_factory.mktemp("fedge-run")
    return Federation(None, RunConfig.parse({**RUN_CONFIG, "out-dir": str(out)}))  # type: ignore[arg-type]


def _request(fed: Federation, task: str, node: int = 7) -> Message:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in task_slice(fed.state, task).items()})
    config = ConfigRecord({"server-round": ROUND, "task": task})
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=MessageType.TRAIN
    )


def _delta(fed: Federation, task: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        k: (0.01 * rng.normal(size=v.shape)).astype(np.float32)
        for k, v in task_slice(fed.state, task).items()
    }


GOOD_METRICS = {"num-examples": 32.0, "train_loss": 1.5, "server-round": ROUND, "upload-bytes": 100}


def _reply(
    request: Message,
    delta: dict[str, np.ndarray] | None,
    metrics: dict | None = None,
    with_metrics: bool = True,
) -> Message:
    """A reply as `clients.client_app.train` builds it."""
    content = RecordDict()
    if delta is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in delta.items()})
    if with_metrics:
        content["metrics"] = MetricRecord(GOOD_METRICS if metrics is None else metrics)
    return Message(content, reply_to=request)


def test_a_good_reply_passes(fed: Federation) -> None:
    for task in ("sensor", "tv", "phone"):
        assert fed._check_reply(_reply(_request(fed, task), _delta(fed, task)), task, ROUND) is None


def _reason(fed: Federation, reply: Message, task: str = "sensor") -> str:
    reason = fed._check_reply(reply, task, ROUND)
    assert isinstance(reason, str) and reason
    return reason


def test_nan_and_inf_are_refused(fed: Federation) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        delta = _delta(fed, "sensor")
        delta["lora.conv3.lora_B.weight"][5, 2, 0] = bad
        reason = _reason(fed, _reply(_request(fed, "sensor"), delta))
        assert "lora.conv3.lora_B.weight" in reason and "NaN or inf" in reason


def test_wrong_shape_is_refused(fed: Federation) -> None:
    delta = _delta(fed, "sensor")
    delta["head.out.weight"] = np.zeros((8, 64), np.float32)  # 8 classes instead of 7
    reason = _reason(fed, _reply(_request(fed, "sensor"), delta))
    assert "head.out.weight" in reason and "(8, 64)" in reason and "(7, 64)" in reason
    # a LoRA B of another rank
    delta = _delta(fed, "sensor")
    delta["lora.proj.lora_B.weight"] = np.zeros((64, 4), np.float32)
    assert "lora.proj.lora_B.weight" in _reason(fed, _reply(_request(fed, "sensor"), delta))


def test_declared_shape_cannot_hide_the_real_one(fed: Federation) -> None:
    """The Array's metadata claims the expected shape; its payload holds another."""
    delta = _delta(fed, "sensor")
    arrays = ArrayRecord({k: Array(v) for k, v in delta.items()})
    real = Array(np.zeros((3, 3), np.float32))
    arrays["head.bias"] = Array(dtype=real.dtype, shape=(7,), stype=real.stype, data=real.data)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(GOOD_METRICS)})
    reply = Message(content, reply_to=_request(fed, "sensor"))
    assert "head.bias" in _reason(fed, reply)


def test_wrong_keys_are_refused(fed: Federation) -> None:
    request = _request(fed, "sensor")
    delta = _delta(fed, "sensor")
    del delta["lora.conv2.lora_B.weight"]
    assert "missing" in (r := _reason(fed, _reply(request, delta))) and "lora.conv2" in r
    delta = {**_delta(fed, "sensor"), "head.private_user": np.zeros(17, np.float32)}
    assert "unexpected" in (r := _reason(fed, _reply(request, delta))) and "head.private_user" in r
    # a TV's update checked as a sensor's (and the task prefix must not be sent)
    assert "missing" in _reason(fed, _reply(request, _delta(fed, "tv")))
    prefixed = {f"sensor/{k}": v for k, v in _delta(fed, "sensor").items()}
    assert "missing" in _reason(fed, _reply(request, prefixed))


def test_integer_arrays_are_refused(fed: Federation) -> None:
    delta = _delta(fed, "sensor")
    delta["head.out.bias"] = np.zeros(7, np.int32)
    assert "dtype" in _reason(fed, _reply(_request(fed, "sensor"), delta))


def test_reply_for_another_round_is_refused(fed: Federation) -> None:
    request = _request(fed, "sensor")
    for other in (ROUND - 1, ROUND + 1):
        metrics = {"num-examples": 32.0, "train_loss": 1.0, "server-round": other}
        reason = _reason(fed, _reply(request, _delta(fed, "sensor"), metrics))
        assert f"round {other}" in reason and f"not {ROUND}" in reason
    # no round at all
    reason = _reason(fed, _reply(request, _delta(fed, "sensor"), {"num-examples": 32.0}))
    assert "round" in reason


@pytest.mark.parametrize("weight", [0.0, -5.0, float("nan")])
def test_bad_weight_is_refused(fed: Federation, weight: float) -> None:
    metrics = {"num-examples": weight, "train_loss": 1.0, "server-round": ROUND}
    assert "num-examples" in _reason(fed, _reply(_request(fed, "sensor"), _delta(fed, "sensor"), metrics))


def test_missing_parts_and_unreadable_arrays_are_refused(fed: Federation) -> None:
    request = _request(fed, "sensor")
    assert "lacks" in _reason(fed, _reply(request, None))
    assert "lacks" in _reason(fed, _reply(request, _delta(fed, "sensor"), with_metrics=False))
    arrays = ArrayRecord({k: Array(v) for k, v in _delta(fed, "sensor").items()})
    arrays["head.bias"] = Array(dtype="float32", shape=(7,), stype="numpy.ndarray", data=b"not an array")
    reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(GOOD_METRICS)}), reply_to=request)
    assert "unreadable" in _reason(fed, reply)


def test_the_real_client_reply_passes(fed: Federation) -> None:
    from clients.client_app import app

    partition = 2  # the smoke fleet's first sensor
    ctx = Context(
        run_id=1,
        node_id=102,
        node_config={"partition-id": partition, "num-partitions": 8},
        state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )
    request = _request(fed, "sensor", node=102)
    reply = app(request, ctx)
    assert not reply.has_error()
    assert fed._check_reply(reply, "sensor", ROUND) is None
    assert fed._check_reply(reply, "sensor", ROUND + 1) is not None
    assert fed._check_reply(reply, "tv", ROUND) is not None
