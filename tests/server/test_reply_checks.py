"""The server's gate in front of aggregation: `RunState._check_reply` on real Flower replies.

`RunState` takes its Grid only to send messages; the check needs none, so a real `RunState`
of the smoke scenario is built with `grid=None` (its global state and shapes are the real ones).
Replies are built as the ClientApp builds them: `Message(RecordDict(...), reply_to=request)`
carrying a *contribution* (weighted delta + `KEY#weight` weights, `federation.rules.exact_mixed_rank`);
one comes from the real ClientApp itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from federation.config import RunConfig
from federation.model.edge import task_slice
from federation.rules.exact_mixed_rank import WEIGHT, contribution, is_column_key
from server.loop import RunState

ROUND = 3
RUN_CONFIG = {"scenario": "smoke", "local-steps": 2}


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> RunState:
    out = tmp_path_factory.mktemp("fedge-run")
    return RunState(None, RunConfig.parse({**RUN_CONFIG, "out-dir": str(out)}))  # type: ignore[arg-type]


def _request(fed: RunState, task: str, node: int = 7) -> Message:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in task_slice(fed.state, task).items()})
    config = ConfigRecord({"server-round": ROUND, "task": task})
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=MessageType.TRAIN
    )


def _delta(fed: RunState, task: str, rank: int | None = None) -> dict[str, np.ndarray]:
    """A device's delta; a rank-`rank` device's B is zero beyond its first `rank` columns."""
    rng = np.random.default_rng(0)
    delta = {
        k: (0.01 * rng.normal(size=v.shape)).astype(np.float32)
        for k, v in task_slice(fed.state, task).items()
    }
    for key, value in delta.items():
        if rank is not None and is_column_key(key):
            value[:, rank:] = 0.0
    return delta


WEIGHT_32 = 32.0  # num-examples: sensor steps x batch (phone: sequences)


def _upload(fed: RunState, task: str, rank: int | None = None, weight: float = WEIGHT_32):
    """What the ClientApp uploads: the contribution of a delta."""
    return contribution(_delta(fed, task, rank), weight, rank=rank)


GOOD_METRICS = {"num-examples": WEIGHT_32, "train_loss": 1.5, "server-round": ROUND, "upload-bytes": 100}


def _reply(
    request: Message,
    upload: dict[str, np.ndarray] | None,
    metrics: dict | None = None,
    with_metrics: bool = True,
) -> Message:
    """A reply as `clients.client_app.train` builds it."""
    content = RecordDict()
    if upload is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in upload.items()})
    if with_metrics:
        content["metrics"] = MetricRecord(GOOD_METRICS if metrics is None else metrics)
    return Message(content, reply_to=request)


@pytest.mark.parametrize("rank", [None, 2, 4])
def test_a_good_reply_passes(fed: RunState, rank: int | None) -> None:
    for task in ("sensor", "tv", "phone"):
        upload = _upload(fed, task, rank)
        assert fed._check_reply(_reply(_request(fed, task), upload), task, ROUND) is None


def _reason(fed: RunState, reply: Message, task: str = "sensor") -> str:
    reason = fed._check_reply(reply, task, ROUND)
    assert isinstance(reason, str) and reason
    return reason


def test_nan_and_inf_are_refused(fed: RunState) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        upload = _upload(fed, "sensor")
        upload["lora.conv3.lora_B.weight"][5, 2, 0] = bad
        reason = _reason(fed, _reply(_request(fed, "sensor"), upload))
        assert "lora.conv3.lora_B.weight" in reason and "NaN or inf" in reason
        upload = _upload(fed, "sensor")
        upload["head.classes.bias" + WEIGHT][0] = bad
        reason = _reason(fed, _reply(_request(fed, "sensor"), upload))
        assert "head.classes.bias#weight" in reason and "NaN or inf" in reason


def test_wrong_shape_is_refused(fed: RunState) -> None:
    upload = _upload(fed, "sensor")
    upload["head.classes.weight"] = np.zeros((8, 64), np.float32)  # 8 classes instead of 7
    reason = _reason(fed, _reply(_request(fed, "sensor"), upload))
    assert "head.classes.weight" in reason and "(8, 64)" in reason and "(7, 64)" in reason
    # a LoRA B of another rank: a rank-4 device must still pad to the r_max = 8 columns
    upload = _upload(fed, "sensor", rank=4)
    upload["lora.proj.lora_B.weight"] = upload["lora.proj.lora_B.weight"][:, :4].copy()
    assert "lora.proj.lora_B.weight" in _reason(fed, _reply(_request(fed, "sensor"), upload))
    # and one weight per column
    upload = _upload(fed, "sensor", rank=4)
    upload["lora.proj.lora_B.weight#weight"] = upload["lora.proj.lora_B.weight#weight"][:4].copy()
    assert "lora.proj.lora_B.weight#weight" in _reason(fed, _reply(_request(fed, "sensor"), upload))


def test_declared_shape_cannot_hide_the_real_one(fed: RunState) -> None:
    """The Array's metadata claims the expected shape; its payload holds another."""
    arrays = ArrayRecord({k: Array(v) for k, v in _upload(fed, "sensor").items()})
    real = Array(np.zeros((3, 3), np.float32))
    arrays["head.classes.bias"] = Array(dtype=real.dtype, shape=(7,), stype=real.stype, data=real.data)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(GOOD_METRICS)})
    reply = Message(content, reply_to=_request(fed, "sensor"))
    assert "head.classes.bias" in _reason(fed, reply)


def test_wrong_keys_are_refused(fed: RunState) -> None:
    request = _request(fed, "sensor")
    upload = _upload(fed, "sensor")
    del upload["lora.conv2.lora_B.weight"], upload["lora.conv2.lora_B.weight#weight"]
    assert "missing" in (r := _reason(fed, _reply(request, upload))) and "lora.conv2" in r
    upload = _upload(fed, "sensor")
    del upload["head.classes.weight#weight"]  # a value without the weight behind it
    assert "missing" in (r := _reason(fed, _reply(request, upload))) and "head.classes.weight#weight" in r
    upload = {**_upload(fed, "sensor"), "head.private_user": np.zeros(17, np.float32)}
    assert "unexpected" in (r := _reason(fed, _reply(request, upload))) and "head.private_user" in r
    # a raw delta (the old upload, without weights) is not a contribution
    assert "missing" in (r := _reason(fed, _reply(request, _delta(fed, "sensor")))) and WEIGHT in r
    # a TV's contribution checked as a sensor's (and the task prefix must not be sent)
    assert "missing" in _reason(fed, _reply(request, _upload(fed, "tv")))
    prefixed = {f"sensor/{k}": v for k, v in _upload(fed, "sensor").items()}
    assert "missing" in _reason(fed, _reply(request, prefixed))


def test_integer_arrays_are_refused(fed: RunState) -> None:
    upload = _upload(fed, "sensor")
    upload["head.classes.bias"] = np.zeros(7, np.int32)
    assert "dtype" in _reason(fed, _reply(_request(fed, "sensor"), upload))
    upload = _upload(fed, "sensor")
    upload["head.classes.bias#weight"] = np.full(7, 32, np.int64)
    assert "dtype" in _reason(fed, _reply(_request(fed, "sensor"), upload))


def test_reply_for_another_round_is_refused(fed: RunState) -> None:
    request = _request(fed, "sensor")
    for other in (ROUND - 1, ROUND + 1):
        metrics = {"num-examples": WEIGHT_32, "train_loss": 1.0, "server-round": other}
        reason = _reason(fed, _reply(request, _upload(fed, "sensor"), metrics))
        assert f"round {other}" in reason and f"not {ROUND}" in reason
    # no round at all
    reason = _reason(fed, _reply(request, _upload(fed, "sensor"), {"num-examples": WEIGHT_32}))
    assert "round" in reason


def _claim(upload: dict[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """Rewrite every trained entry of the `#weight` vectors to `weight` (a forged or broken claim)."""
    for key in list(upload):
        if key.endswith(WEIGHT):
            upload[key] = np.where(upload[key] != 0, weight, 0).astype(np.float32)
    return upload


@pytest.mark.parametrize(
    ("weight", "words"),
    [(0.0, "positive"), (-5.0, "outside"), (float("nan"), "NaN"), (float("inf"), "inf")],
)
def test_bad_weight_is_refused(fed: RunState, weight: float, words: str) -> None:
    upload = _claim(_upload(fed, "sensor", rank=2), weight)
    assert words in _reason(fed, _reply(_request(fed, "sensor"), upload))


def test_weight_above_max_weight_is_refused(fed: RunState) -> None:
    max_weight = fed.run.max_weight
    assert (
        fed._check_reply(
            _reply(_request(fed, "sensor"), _upload(fed, "sensor", weight=max_weight)), "sensor", ROUND
        )
        is None
    )
    reason = _reason(fed, _reply(_request(fed, "sensor"), _upload(fed, "sensor", weight=2 * max_weight)))
    assert "outside" in reason and str(max_weight) in reason


def test_weights_that_are_not_a_prefix_are_refused(fed: RunState) -> None:
    upload = _upload(fed, "sensor", rank=4)
    key = "lora.conv2.lora_B.weight#weight"
    upload[key] = upload[key][::-1].copy()  # columns 4..7 claimed, 0..3 not
    upload["lora.conv2.lora_B.weight"] = np.zeros_like(upload["lora.conv2.lora_B.weight"])
    assert "prefix" in (r := _reason(fed, _reply(_request(fed, "sensor"), upload))) and key in r


def test_values_in_untrained_columns_are_refused(fed: RunState) -> None:
    upload = _upload(fed, "sensor", rank=2)
    upload["lora.proj.lora_B.weight"][3, 5] = 0.01  # column 5: a rank-2 device has no parameter there
    reason = _reason(fed, _reply(_request(fed, "sensor"), upload))
    assert "lora.proj.lora_B.weight" in reason and "did not train" in reason


def test_missing_parts_and_unreadable_arrays_are_refused(fed: RunState) -> None:
    request = _request(fed, "sensor")
    assert "lacks" in _reason(fed, _reply(request, None))
    assert "lacks" in _reason(fed, _reply(request, _upload(fed, "sensor"), with_metrics=False))
    arrays = ArrayRecord({k: Array(v) for k, v in _upload(fed, "sensor").items()})
    arrays["head.classes.bias"] = Array(
        dtype="float32", shape=(7,), stype="numpy.ndarray", data=b"not an array"
    )
    reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(GOOD_METRICS)}), reply_to=request)
    assert "unreadable" in _reason(fed, reply)


def test_the_real_client_reply_passes(fed: RunState) -> None:
    from clients.client_app import app

    partition = 2  # the smoke fleet's first sensor: tier low, LoRA rank 2
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
    # a rank-2 device's contribution: weight on B's first 2 columns only
    weights = reply.content["arrays"]["lora.proj.lora_B.weight#weight"].numpy()
    examples = reply.content["metrics"]["num-examples"]
    np.testing.assert_array_equal(weights, [examples] * 2 + [0.0] * 6)
