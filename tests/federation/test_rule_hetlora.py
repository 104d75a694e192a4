"""`hetlora` (HetLoRA, Cho et al., EMNLP 2024 Findings): zero-padded A and B averaged with weights
||B_k A_k||_F, a rank-r device truncating the global adapter, and rank self-pruning; checked
against an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.model.edge import build_task_model
from federation.rules import get_rule
from federation.rules.hetlora import RANK, TAIL_NORM, device_keep, device_rank, pruned_rank

HET = get_rule("hetlora")
B, A, HEAD = "lora.q.lora_B.weight", "lora.q.lora_A.weight", "head.bias"
SHAPES = {B: (3, 4), A: (4, 5), HEAD: (2,)}


def test_zero_padded_adapters_are_averaged_with_their_update_norms() -> None:
    rng = np.random.default_rng(7)
    ranks, examples = (4, 2, 1), (10.0, 50.0, 40.0)
    devices = []
    for r in ranks:
        b, a = rng.normal(size=SHAPES[B]), rng.normal(size=SHAPES[A])
        b[:, r:], a[r:] = 0, 0
        devices.append(
            {B: b.astype(np.float32), A: a.astype(np.float32), HEAD: rng.normal(size=2).astype(np.float32)}
        )
    g = {B: np.ones(SHAPES[B], np.float32), A: np.ones(SHAPES[A], np.float32), HEAD: np.zeros(2, np.float32)}
    agg = HET.init()
    for d, w, r in zip(devices, examples, ranks, strict=True):
        up = HET.upload(d, w, r)
        assert HET.check(up, SHAPES, 1e5) is None
        HET.add(agg, up)
    new = HET.update(g, HET.finalize(agg), 1.0)
    norms = np.array([np.linalg.norm(d[B].astype(np.float64) @ d[A]) for d in devices])
    s = norms / norms.sum()
    for key in (A, B):  # zero-padded: a rank-1 device counts as zeros beyond its first row / column
        np.testing.assert_allclose(
            new[key], sum(sk * d[key] for sk, d in zip(s, devices, strict=True)), atol=1e-5
        )
    p = np.array(examples) / sum(examples)
    np.testing.assert_allclose(
        new[HEAD], sum(pk * d[HEAD] for pk, d in zip(p, devices, strict=True)), atol=1e-6
    )
    # the weights are not the examples: norm weighting is what the rule adds
    assert np.abs(s - p).max() > 0.05


def test_rank_self_pruning_when_the_top_ranks_fade() -> None:
    assert [pruned_rank(r) for r in (8, 4, 2)] == [7, 3, 1]  # floor(0.9 r), at least one rank
    rng = np.random.default_rng(1)
    trained = {B: rng.normal(size=SHAPES[B]), A: rng.normal(size=SHAPES[A])}
    top = np.linalg.norm(trained[B][:, 3:4] @ trained[A][3:4])
    first = device_keep({}, trained, 4)  # first round: remember the top rank's norm, keep the rank
    assert first[RANK][0] == 4 and math.isclose(first[TAIL_NORM][0], top, rel_tol=1e-9)
    grown = device_keep({RANK: np.array([4.0]), TAIL_NORM: np.array([top / 2])}, trained, 4)
    assert grown[RANK][0] == 4  # it grew: keep training rank 4
    faded = device_keep({RANK: np.array([4.0]), TAIL_NORM: np.array([top * 2])}, trained, 4)
    assert faded[RANK][0] == 3  # it fell: prune to 3
    assert device_rank(faded, 4) == 3 and device_rank({}, 4) == 4
    assert device_rank({RANK: np.array([8.0])}, 2) == 2  # never above the tier's rank


def test_a_rank_2_device_drops_the_global_adapter_beyond_its_rank() -> None:
    x = torch.randn(2, 6, 100, generator=torch.Generator().manual_seed(0))
    het = RunConfig.parse({"scenario": "smoke", "aggregation": "hetlora", "secure-aggregation": False})
    default = RunConfig.parse({"scenario": "smoke"})
    outputs = {}
    for name, run in (("het", het), ("default", default)):
        model = build_task_model("sensor", run.lora, run.seed, rank=2, run=run)
        rng = np.random.default_rng(0)
        state = {k: (0.3 * rng.normal(size=s)).astype(np.float32) for k, s in model.shared_shapes().items()}
        cut = {k: v.copy() for k, v in state.items()}
        for k in cut:
            if ".lora_B." in k:
                cut[k][:, 2:] = 0
        with torch.no_grad():
            model.load_shared_state(state)
            whole = model(x)
            model.load_shared_state(cut)
            outputs[name] = (whole, model(x))
    assert torch.allclose(*outputs["het"], atol=1e-6)  # HetLoRA: the tail is not part of the model
    assert not torch.allclose(*outputs["default"], atol=1e-3)  # fedge's default: held frozen


def test_hetlora_is_not_a_sum() -> None:
    assert not HET.is_sum and "norm" in HET.not_sum_reason
    with pytest.raises(FedgeError, match="cannot run with secure aggregation"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "hetlora"})
