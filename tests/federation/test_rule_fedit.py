"""`fedit` (FedIT, Zhang et al., ICASSP 2024): the weighted average of A and of B, each on its own,
checked against an independent numpy computation; its secure vector; its inexactness; what it
asks of devices and fleets."""

from __future__ import annotations

import numpy as np
import pytest
from rule_cases import HEAD, SHAPES, WEIGHTS, A, B, device_deltas, global_state, run_round

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.rules import get_rule
from federation.secagg.protocol import plan
from federation.secagg.quantize import quantization_error_bound
from federation.secagg.vector import check_plausible_sum, decode_total, encode_update, vector_length

FEDIT = get_rule("fedit")


def test_fedit_averages_a_and_b_separately_over_every_device() -> None:
    g, deltas = global_state(), device_deltas(3)
    new = run_round(FEDIT, g, deltas)
    p = np.array(WEIGHTS) / sum(WEIGHTS)  # 1/7, 2/7, 4/7
    for key in (A, B, HEAD):
        a_k = [g[key].astype(np.float64) + d[key] for d in deltas]  # each device's trained matrix
        expected = sum(pk * m for pk, m in zip(p, a_k, strict=True))
        np.testing.assert_allclose(new[key], expected, atol=1e-6)
        # the bug of a public baseline: client 0's adapter alone is not the average
        assert np.abs(new[key] - a_k[0]).max() > 1e-3


def test_fedit_is_not_the_average_of_the_products_by_the_weighted_covariance() -> None:
    g, deltas = global_state(), device_deltas(3)
    new = run_round(FEDIT, g, deltas)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    b_k = [g[B].astype(np.float64) + d[B] for d in deltas]
    a_k = [g[A].astype(np.float64) + d[A] for d in deltas]
    mean_of_products = sum(pk * b @ a for pk, b, a in zip(p, b_k, a_k, strict=True))
    product_of_means = new[B].astype(np.float64) @ new[A].astype(np.float64)
    # the gap is sum p_k (B_k - B')(A_k - A'): what FedEx-LoRA folds back into the weights
    gap = sum(pk * (b - new[B]) @ (a - new[A]) for pk, b, a in zip(p, b_k, a_k, strict=True))
    np.testing.assert_allclose(mean_of_products - product_of_means, gap, atol=1e-5)
    assert np.abs(gap).max() > 0.05


def test_fedit_is_a_sum_that_secure_aggregation_carries() -> None:
    assert FEDIT.is_sum
    g, deltas = global_state(), device_deltas(3)
    params = plan(1, 1, "t", 3, vector_length(FEDIT, SHAPES), clip=2.0, value_bits=24, max_weight=50)
    total = sum(
        encode_update(FEDIT, d, int(w), SHAPES, params, rank=2) for d, w in zip(deltas, WEIGHTS, strict=True)
    )
    decoded = decode_total(FEDIT, np.asarray(total) % (1 << params.modulus_bits), SHAPES, params)
    assert check_plausible_sum(FEDIT, decoded, SHAPES, params, 3) == sum(WEIGHTS)
    secure = FEDIT.update(g, FEDIT.finalize(FEDIT.add(FEDIT.init(), decoded)), 1.0)
    plain = run_round(FEDIT, g, deltas)
    quantum = quantization_error_bound(2.0, 24, 1)
    for key in (A, B, HEAD):
        np.testing.assert_allclose(secure[key], plain[key], atol=4 * quantum + 1e-6)


def test_fedit_trains_a_and_needs_one_rank() -> None:
    assert FEDIT.adapter.train_a and not FEDIT.adapter.lora_fa
    with pytest.raises(FedgeError, match=r"aggregation='fedit' needs every device to train one LoRA rank.*"
                       r"mixes ranks \[2, 4, 8\]: set uniform-rank"):  # fmt: skip
        RunConfig.parse({"scenario": "smoke", "aggregation": "fedit"})
    assert RunConfig.parse({"scenario": "smoke", "aggregation": "fedit", "uniform-rank": 4}).rule is FEDIT


def test_a_fedit_sensor_trains_a_and_b_of_its_rank_with_adamw() -> None:
    from federation.fleet import Device, all_data_clients, load_device_data
    from federation.local import local_train, task_model
    from federation.model.edge import initial_state, task_slice
    from federation.training import TrainSettings, _optimizers

    run = RunConfig.parse({"scenario": "smoke", "aggregation": "fedit", "uniform-rank": 2, "local-steps": 3})
    device = Device("sensor", all_data_clients("sensor")[0], "high")
    shared = task_slice(initial_state(("sensor",), run.lora, run.seed, run), "sensor")
    a_keys = [k for k in shared if ".lora_A." in k]
    assert a_keys and all(shared[k].shape[0] == run.lora.rank for k in a_keys)  # A travels, r_max rows
    result = local_train(run, device, load_device_data(device, run.seed), shared, 1)
    assert result.rank == 2
    for key in a_keys:
        assert np.abs(result.delta[key][:2]).max() > 0, key  # A was trained
        assert not result.delta[key][2:].any(), key  # and only the device's rows
    upload = FEDIT.upload(result.delta, result.metrics["num-examples"], result.rank)
    assert FEDIT.check(upload, {k: v.shape for k, v in shared.items()}, run.max_weight) is None
    model = task_model(run, "sensor", 2)
    optimizers = _optimizers(model, TrainSettings(steps=1))
    assert all(type(o).__name__ == "AdamW" for o in optimizers)
    trained = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    assert all(id(p) in trained for n, p in model.backbone.named_parameters() if ".lora_A." in n)
