"""`flexlora` (FlexLoRA, Bai et al., NeurIPS 2024): the weighted sum of the devices' full products
B_k A_k, cut back to r_max by truncated SVD; a rank-r device takes the rank-r truncation; the
reconstruction error is the discarded singular values."""

from __future__ import annotations

import numpy as np
import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.rules import get_rule
from federation.rules.flexlora import truncated_svd

FLEX = get_rule("flexlora")
B, A, HEAD = "lora.q.lora_B.weight", "lora.q.lora_A.weight", "head.bias"
SHAPES = {B: (5, 2), A: (2, 6), HEAD: (2,)}
WEIGHTS = (10.0, 30.0, 60.0)


def _devices(ranks: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for r in ranks:
        b, a = rng.normal(size=SHAPES[B]), rng.normal(size=SHAPES[A])
        b[:, r:], a[r:] = 0, 0  # a rank-r device holds nothing beyond r
        out.append(
            {B: b.astype(np.float32), A: a.astype(np.float32), HEAD: rng.normal(size=2).astype(np.float32)}
        )
    return out


def test_the_new_adapter_is_the_rank_r_max_truncation_of_the_weighted_mean_of_products() -> None:
    ranks = (1, 2, 2)
    devices = _devices(ranks)
    g = {B: np.zeros(SHAPES[B], np.float32), A: np.ones(SHAPES[A], np.float32), HEAD: np.zeros(2, np.float32)}
    agg = FLEX.init()
    for values, w, r in zip(devices, WEIGHTS, ranks, strict=True):
        up = FLEX.upload(values, w, r)
        assert FLEX.check(up, SHAPES, 1e5) is None
        FLEX.add(agg, up)
    new = FLEX.update(g, FLEX.finalize(agg), 1.0)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    w = sum(pk * d[B].astype(np.float64) @ d[A].astype(np.float64) for pk, d in zip(p, devices, strict=True))
    u, s, vt = np.linalg.svd(w)
    assert len(s) == 5 and s[2] > 1e-3  # three devices of rank <= 2: W has rank 3 > r_max = 2
    best = (u[:, :2] * s[:2]) @ vt[:2]  # Eckart-Young: the best rank-2 approximation
    product = new[B].astype(np.float64) @ new[A].astype(np.float64)
    np.testing.assert_allclose(product, best, atol=1e-5)
    # the error is exactly the discarded singular values
    np.testing.assert_allclose(np.linalg.norm(w - product), np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-5)
    # a rank-1 device takes the first column / row: the rank-1 truncation itself
    np.testing.assert_allclose(np.outer(new[B][:, 0], new[A][0]), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)
    # heads: weight x delta uploaded, the weighted mean delta applied
    np.testing.assert_allclose(
        new[HEAD], sum(pk * d[HEAD] for pk, d in zip(p, devices, strict=True)), atol=1e-6
    )


def test_truncated_svd_of_a_conv_weight_and_of_a_low_rank_sum() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 5))  # a Conv1d weight change [out, in, k]
    b, a, s = truncated_svd(w, 2, (4, 3, 1), (3, 3, 5))  # r_max = 3, keep 2
    assert b.shape == (4, 3, 1) and a.shape == (3, 3, 5) and not b[:, 2:].any() and not a[2:].any()
    approx = np.einsum("or,r...->o...", b[:, :, 0], a)
    np.testing.assert_allclose(np.linalg.norm(w - approx), np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-6)


def test_flexlora_is_not_a_sum_and_takes_mixed_ranks() -> None:
    assert not FLEX.is_sum and FLEX.adapter.truncate and FLEX.adapter.upload_full
    with pytest.raises(FedgeError, match="cannot run with secure aggregation"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "flexlora"})
    plain = {"scenario": "smoke", "aggregation": "flexlora", "secure-aggregation": False}
    plain["served-average"] = 0.0  # its SVD factors do not average
    assert RunConfig.parse(plain).rule is FLEX
