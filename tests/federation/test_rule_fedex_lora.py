"""`fedex-lora` (FedEx-LoRA, Singhal et al., NAACL 2025): FedIT's averages plus the exact residual,
checked against an independent numpy computation of the paper's formula, and the LoRA scaling
applied to the residual where the weight is formed (a public library dropped it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rule_cases import HEAD, WEIGHTS, A, B, R, device_deltas, global_state, run_round

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.model.edge import build_task_model
from federation.model.lora import lora_layers, lora_product
from federation.rules import get_rule

FEDEX = get_rule("fedex-lora")


def test_the_merged_model_is_exactly_the_weighted_mean_of_the_devices_models() -> None:
    g, deltas = global_state(residual=True), device_deltas(3)
    new = run_round(FEDEX, g, deltas)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    b_k = [g[B].astype(np.float64) + d[B] for d in deltas]
    a_k = [g[A].astype(np.float64) + d[A] for d in deltas]
    # the adapter is FedIT's: A and B averaged separately
    np.testing.assert_allclose(new[B], sum(pk * b for pk, b in zip(p, b_k, strict=True)), atol=1e-6)
    np.testing.assert_allclose(new[A], sum(pk * a for pk, a in zip(p, a_k, strict=True)), atol=1e-6)
    # and R' + B'A' = R + sum_k p_k B_k A_k: the residual makes the product exact
    mean_product = sum(pk * b @ a for pk, b, a in zip(p, b_k, a_k, strict=True))
    merged = new[R].astype(np.float64) + new[B].astype(np.float64) @ new[A].astype(np.float64)
    np.testing.assert_allclose(merged, g[R] + mean_product, atol=1e-5)
    assert np.abs(new[R] - g[R]).max() > 1e-2  # the residual moved: FedIT alone is not exact
    head = g[HEAD] + sum(pk * d[HEAD] for pk, d in zip(p, deltas, strict=True))
    np.testing.assert_allclose(new[HEAD], head, atol=1e-6)


def test_the_residual_is_scaled_by_alpha_over_r_where_the_weight_is_formed() -> None:
    """On a real model (the sensor's Conv1d LoRA): weight = W0 + s (R + B A), s = alpha / r_max."""
    run = RunConfig.parse(
        {"scenario": "smoke", "aggregation": "fedex-lora", "uniform-rank": 8, "secure-aggregation": False}
    )
    model = build_task_model("sensor", run.lora, run.seed, run=run)
    rng = np.random.default_rng(0)
    state = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in model.shared_shapes().items()}
    assert any(k.endswith(".lora_residual") for k in state)
    model.load_shared_state(state)
    s = run.lora.alpha / run.lora.rank
    assert s == 2.0
    for name, layer in lora_layers(model.backbone).items():
        key = "lora." + name.removeprefix("base_model.model.")
        base = layer.get_base_layer()
        assert layer.scaling["default"] == s
        pristine = model._tails[f"{key}.lora_B.weight"].pristine.double()
        residual = torch.as_tensor(state[f"{key}.lora_residual"]).double()
        np.testing.assert_allclose(base.weight.detach().double(), pristine + s * residual, atol=1e-6)
        # and the adapter path on top: the layer computes with W0 + s (R + B A)
        b = torch.as_tensor(state[f"{key}.lora_B.weight"]).double()
        a = torch.as_tensor(state[f"{key}.lora_A.weight"]).double()
        effective = base.weight.detach().double() + s * lora_product(b, a)
        np.testing.assert_allclose(effective, pristine + s * (residual + lora_product(b, a)), atol=1e-6)
    assert model.shared_state().keys() == state.keys()


def test_fedex_is_not_a_sum_and_needs_one_rank() -> None:
    assert not FEDEX.is_sum and "product" in FEDEX.not_sum_reason
    with pytest.raises(FedgeError, match="cannot run with secure aggregation"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "fedex-lora", "uniform-rank": 4})
    with pytest.raises(FedgeError, match="needs every device to train one LoRA rank"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "fedex-lora", "secure-aggregation": False})
    run = RunConfig.parse(
        {"scenario": "smoke", "aggregation": "fedex-lora", "secure-aggregation": False, "uniform-rank": 4}
    )
    assert run.rule is FEDEX and FEDEX.adapter.residual and FEDEX.adapter.train_a
