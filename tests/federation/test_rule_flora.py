"""`flora` (FLoRA, Wang et al., NeurIPS 2024): the stacked modules' product, sum_k p_k B_k A_k / P,
merged into the residual, adapters re-initialised; mixed ranks; checked against an independent
numpy computation of the stacking itself."""

from __future__ import annotations

import numpy as np
import pytest
from rule_cases import HEAD, WEIGHTS, A, B, R, device_deltas, global_state, run_round

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.rules import get_rule

FLORA = get_rule("flora")


def test_stacking_merges_the_weighted_sum_of_products_and_resets_the_adapter() -> None:
    ranks = (2, 1, 2)  # mixed ranks: the rank-1 device trains B's first column and A's first row
    g = global_state(residual=True, b_zero=True)  # every FLoRA round starts from B = 0, A = A0
    deltas = device_deltas(3, ranks=ranks)
    new = run_round(FLORA, g, deltas, ranks=ranks)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    # the stacking of the paper, built by hand: [p_1 B_1 | p_2 B_2 | p_3 B_3] [A_1; A_2; A_3]
    b_k = [d[B][:, :r].astype(np.float64) for d, r in zip(deltas, ranks, strict=True)]  # B_k = dB_k
    a_k = [(g[A] + d[A])[:r].astype(np.float64) for d, r in zip(deltas, ranks, strict=True)]
    b_stack = np.concatenate([pk * b for pk, b in zip(p, b_k, strict=True)], axis=1)
    a_stack = np.concatenate(a_k, axis=0)
    assert b_stack.shape == (3, 5) and a_stack.shape == (5, 4)
    np.testing.assert_allclose(new[R], g[R] + b_stack @ a_stack, atol=1e-5)
    assert not new[B].any()  # a fresh adapter: B = 0
    np.testing.assert_array_equal(new[A], g[A])  # A back at A0
    head = g[HEAD] + sum(pk * d[HEAD] for pk, d in zip(p, deltas, strict=True))
    np.testing.assert_allclose(new[HEAD], head, atol=1e-6)


def test_flora_is_not_a_sum_and_takes_mixed_ranks() -> None:
    assert not FLORA.is_sum and "stacking" in FLORA.not_sum_reason
    with pytest.raises(FedgeError, match="cannot run with secure aggregation"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "flora"})
    run = RunConfig.parse({"scenario": "smoke", "aggregation": "flora", "secure-aggregation": False})
    assert run.rule is FLORA and not FLORA.adapter.uniform_rank and FLORA.adapter.residual


def test_the_residual_is_part_of_the_checkpoint_and_a_resume_needs_the_same_rule(tmp_path) -> None:
    from server.loop import RunState
    from server.round import MetricsEntry

    config = {"scenario": "deploy-check", "aggregation": "flora", "secure-aggregation": False,
              "out-dir": str(tmp_path)}  # fmt: skip
    fed = RunState(None, RunConfig.parse(config), 0, config)  # type: ignore[arg-type]
    residuals = [k for k in fed.state if k.endswith(".lora_residual")]
    assert residuals and all(not fed.state[k].any() for k in residuals)  # zero at the start
    assert any(".lora_A." in k for k in fed.state)
    fed.state[residuals[0]] = fed.state[residuals[0]] + 0.5
    fed.write(MetricsEntry(round=1, eval={}, federated={}, wall_seconds=1.0))
    again = {**config, "initial-checkpoint": str(tmp_path / "checkpoint.safetensors")}
    resumed = RunState(None, RunConfig.parse(again), 0, again)  # type: ignore[arg-type]
    np.testing.assert_array_equal(resumed.state[residuals[0]], fed.state[residuals[0]])
    other = {**again, "aggregation": "exact-mixed-rank", "secure-aggregation": True}
    with pytest.raises(FedgeError, match="does not match this run's model") as refused:
        RunState(None, RunConfig.parse(other), 0, other)  # type: ignore[arg-type]
    assert "has unknown" in str(refused.value) and "lora_residual" in str(refused.value)
