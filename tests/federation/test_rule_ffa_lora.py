"""`ffa-lora` (FFA-LoRA, Sun et al., ICLR 2024): A frozen at the shared seeded init, B alone trained
(plain AdamW) and averaged; the mean of B times A0 is exactly the mean of the devices' updates;
a sum, carried by secure aggregation; one rank."""

from __future__ import annotations

import numpy as np
import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.local import task_model
from federation.rules import get_rule
from federation.secagg.protocol import plan
from federation.secagg.quantize import quantization_error_bound
from federation.secagg.vector import decode_total, encode_update, vector_length
from federation.training import TrainSettings, _optimizers

FFA = get_rule("ffa-lora")
B, HEAD = "lora.q.lora_B.weight", "head.bias"
SHAPES = {B: (3, 2), HEAD: (2,)}
WEIGHTS = (5, 15, 30)


def _deltas() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    return [{k: (0.3 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for _ in WEIGHTS]


def test_the_mean_of_b_times_the_frozen_a_is_the_mean_of_the_updates_in_plaintext_and_secure() -> None:
    a0 = np.random.default_rng(9).normal(size=(2, 4))
    g = {B: np.full(SHAPES[B], 0.1, np.float32), HEAD: np.zeros(2, np.float32)}
    deltas = _deltas()
    agg = FFA.init()
    for d, w in zip(deltas, WEIGHTS, strict=True):
        up = FFA.upload(d, float(w), 2)
        assert FFA.check(up, SHAPES, 1e5) is None
        FFA.add(agg, up)
    new = FFA.update(g, FFA.finalize(agg), 1.0)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    updates = [(g[B] + d[B]).astype(np.float64) @ a0 for d in deltas]  # each device's B_k A0
    mean_update = sum(pk * u for pk, u in zip(p, updates, strict=True))
    np.testing.assert_allclose(new[B].astype(np.float64) @ a0, mean_update, atol=1e-5)
    assert FFA.is_sum
    params = plan(1, 1, "t", 3, vector_length(FFA, SHAPES), clip=1.0, value_bits=24, max_weight=50)
    total = sum(
        encode_update(FFA, d, w, SHAPES, params, rank=2) for d, w in zip(deltas, WEIGHTS, strict=True)
    )
    decoded = decode_total(FFA, np.asarray(total) % (1 << params.modulus_bits), SHAPES, params)
    secure = FFA.update(g, FFA.finalize(FFA.add(FFA.init(), decoded)), 1.0)
    np.testing.assert_allclose(secure[B], new[B], atol=4 * quantization_error_bound(1.0, 24, 1) + 1e-6)


def test_a_stays_frozen_and_b_trains_with_plain_adamw() -> None:
    assert not FFA.adapter.train_a and not FFA.adapter.lora_fa
    run = RunConfig.parse({"scenario": "smoke", "aggregation": "ffa-lora", "uniform-rank": 8})
    model = task_model(run, "phone")
    assert not any(".lora_A." in k for k in model.shared_state())  # A never travels
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if ".lora_A." in n)
    optimizers = _optimizers(model, TrainSettings(steps=1))
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "AdamW"]  # not LoRA-FA's projected step
    default = task_model(RunConfig.parse({"scenario": "smoke"}), "phone")
    assert type(_optimizers(default, TrainSettings(steps=1))[0]).__name__ != "AdamW"


def test_ffa_lora_needs_one_rank() -> None:
    with pytest.raises(FedgeError, match="'ffa-lora' needs every device to train one LoRA rank"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "ffa-lora"})
