"""`fedsa-lora` (FedSA-LoRA, Guo et al., ICLR 2025): A shared and averaged, B kept on the device
from round to round in the node's state beside a TV's private part, never uploaded."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, RecordDict

from clients.device import PRIVATE_KEY, _store, _stored_kept, _stored_private
from federation.config import RunConfig
from federation.errors import FedgeError
from federation.fleet import Device, all_data_clients, load_device_data
from federation.local import local_evaluate, local_train
from federation.model.edge import initial_state, task_slice
from federation.rules import get_rule

FEDSA = get_rule("fedsa-lora")
B, A, HEAD = "lora.q.lora_B.weight", "lora.q.lora_A.weight", "head.bias"
SHAPES = {B: (3, 2), A: (2, 4), HEAD: (2,)}


def test_only_a_and_the_head_travel_and_are_averaged() -> None:
    assert set(FEDSA.layout(SHAPES)) == {A, A + "#weight", HEAD, HEAD + "#weight"}
    with pytest.raises(ValueError, match="keeps B on the device"):
        FEDSA.upload({B: np.ones((3, 2)), A: np.ones((2, 4)), HEAD: np.ones(2)}, 5.0, 2)
    rng = np.random.default_rng(2)
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    deltas = [{A: rng.normal(size=(2, 4)).astype(np.float32), HEAD: rng.normal(size=2).astype(np.float32)}
              for _ in range(3)]  # fmt: skip
    weights = (1.0, 2.0, 7.0)
    agg = FEDSA.init()
    for d, w in zip(deltas, weights, strict=True):
        up = FEDSA.upload(d, w, 2)
        assert FEDSA.check(up, SHAPES, 1e5) is None
        FEDSA.add(agg, up)
    new = FEDSA.update(g, FEDSA.finalize(agg), 1.0)
    for key in (A, HEAD):
        mean = sum(w * d[key] for d, w in zip(deltas, weights, strict=True)) / 10.0
        np.testing.assert_allclose(new[key], g[key] + mean, atol=1e-6)
    np.testing.assert_array_equal(new[B], g[B])  # B is nobody's to move on the server
    assert FEDSA.is_sum


def test_a_device_trains_from_its_own_b_and_keeps_it() -> None:
    run = RunConfig.parse(
        {"scenario": "smoke", "aggregation": "fedsa-lora", "uniform-rank": 4, "local-steps": 3}
    )
    device = Device("sensor", all_data_clients("sensor")[1], "high")
    data = load_device_data(device, run.seed)
    shared = task_slice(initial_state(("sensor",), run.lora, run.seed, run), "sensor")
    b_keys = [k for k in shared if ".lora_B." in k]
    assert b_keys and not any(shared[k].any() for k in b_keys)  # the global B: zero, for ever
    first = local_train(run, device, data, shared, 1)
    assert not any(".lora_B." in k for k in first.delta)  # never in an upload
    assert any(".lora_A." in k for k in first.delta)
    assert set(first.kept) == set(b_keys) and all(np.abs(first.kept[k]).max() > 0 for k in b_keys)
    # the personalised model: shared A with the device's own B differs from the shared part alone
    own = local_evaluate(run, device, data, shared, kept=first.kept)
    alone = local_evaluate(run, device, data, shared)
    assert own["loss_sum"] != alone["loss_sum"]
    # round 2 starts from the kept B, not the global zero B
    second = local_train(run, device, data, shared, 2, kept=first.kept)
    moved = [np.abs(second.kept[k] - first.kept[k]).max() for k in b_keys]
    fresh = local_train(run, device, data, shared, 2)
    assert max(moved) > 0
    assert any(np.abs(second.kept[k] - fresh.kept[k]).max() > 1e-4 for k in b_keys)


def test_the_kept_b_lives_in_the_node_state_beside_a_tvs_private_part() -> None:
    context = Context(1, 2, {}, RecordDict(), {})
    context.state[PRIVATE_KEY] = ArrayRecord({"user": Array(np.arange(3.0))})
    _store(context, None, {B: np.ones((3, 2))})
    assert np.array_equal(_stored_private(context), np.arange(3.0))  # the TV's part is untouched
    np.testing.assert_array_equal(_stored_kept(context)[B], np.ones((3, 2)))
    _store(context, np.zeros(3), {B: np.full((3, 2), 2.0)})
    assert np.array_equal(_stored_private(context), np.zeros(3))
    np.testing.assert_array_equal(_stored_kept(context)[B], np.full((3, 2), 2.0))


def test_fedsa_needs_one_rank() -> None:
    with pytest.raises(FedgeError, match="'fedsa-lora' needs every device to train one LoRA rank"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "fedsa-lora"})
