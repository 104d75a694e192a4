"""Devices of rank r < r_max (`federation.model.edge`, `federation.local`): what they compute,
what they train, what they upload, and that the server's sum of their contributions is exact.

A rank-r task model holds a peft LoRA of rank r (A = the first r rows of the shared frozen A,
B = the first r columns of the global B) and the rest of the global adapter merged into a copy
of its frozen base weights; it reads and writes the r_max-wide shared state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation.config import RunConfig
from federation.fleet import Device, all_data_clients, load_device_data
from federation.local import local_train
from federation.model.edge import TaskModel, build_task_model, task_slice
from federation.model.lora import LoraSettings, frozen_a, peft_alpha, split_for_rank
from federation.rules import exact_mixed_rank
from federation.rules.exact_mixed_rank import is_column_key
from federation.tasks.phone import PhoneModel, phone_loss
from federation.tasks.sensor import SensorModel
from federation.training import TrainSettings, _optimizers, _step

SEED = 0
R_MAX = 8
LORA = LoraSettings()
ATOL = 1e-5


def _random_state(model: TaskModel, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    """A global state with every B column and head entry non-zero (r_max wide)."""
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in model.shared_shapes().items()}


def _trainable(model: TaskModel) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def sensor_x() -> torch.Tensor:
    return torch.randn(6, 6, 100, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def phone_ids() -> torch.Tensor:
    return torch.randint(1000, 5000, (3, 12), generator=torch.Generator().manual_seed(0))


# --- the pieces ---------------------------------------------------------------------------------


def test_split_for_rank_reproduces_the_global_adapter() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(12, R_MAX, generator=gen, dtype=torch.float64)
    a = frozen_a(3, "layer0.query", (R_MAX, 16)).double()
    conv_b = torch.randn(10, R_MAX, 1, generator=gen, dtype=torch.float64)
    conv_a = frozen_a(3, "conv2", (R_MAX, 6, 5)).double()
    for rank in (1, 2, 4, 8):
        b_train, a_train, frozen = split_for_rank(b, a, rank)
        assert b_train.shape == (12, rank) and a_train.shape == (rank, 16)
        torch.testing.assert_close(b_train @ a_train + frozen, b @ a, atol=1e-12, rtol=0)
        cb, ca, cfrozen = split_for_rank(conv_b, conv_a, rank)
        full = torch.einsum("or,rik->oik", conv_b[:, :, 0], conv_a)
        torch.testing.assert_close(torch.einsum("or,rik->oik", cb[:, :, 0], ca) + cfrozen, full)
    # one scaling for every rank: peft's lora_alpha / r = alpha / r_max
    assert all(peft_alpha(r, R_MAX, 16) / r == 16 / R_MAX for r in (1, 2, 4, 8))
    with pytest.raises(ValueError):
        split_for_rank(b, a, 9)


# --- a rank-r model computes what the r_max model computes --------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_sensor_of_rank_r_computes_the_r_max_model(rank: int, sensor_x: torch.Tensor) -> None:
    """Linear (proj) and Conv1d (conv2, conv3: A [r, in, k], B [out, r, 1]) adapters."""
    full = build_task_model("sensor", LORA, SEED)
    small = build_task_model("sensor", LORA, SEED, rank=rank)
    assert isinstance(small, SensorModel) and (small.rank, small.r_max) == (rank, R_MAX)
    state = _random_state(full, seed=rank, scale=0.5)
    full.load_shared_state(state)
    small.load_shared_state(state)
    with torch.no_grad():
        expected, got = full(sensor_x), small(sensor_x)
        plain = build_task_model("sensor", LORA, SEED)
        plain.load_shared_state({k: v * (0 if is_column_key(k) else 1) for k, v in state.items()})
        assert (expected - plain(sensor_x)).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the shared state reads back r_max wide, exactly as loaded
    back = small.shared_state()
    assert all(np.array_equal(back[k], state[k]) for k in state)
    assert small.shared_shapes() == full.shared_shapes()


def test_phone_of_rank_2_computes_the_r_max_model(phone_ids: torch.Tensor) -> None:
    full = build_task_model("phone", LORA, SEED)
    small = build_task_model("phone", LORA, SEED, rank=2)
    assert isinstance(small, PhoneModel)
    state = _random_state(full, seed=1)
    full.load_shared_state(state)
    small.load_shared_state(state)
    with torch.no_grad():
        torch.testing.assert_close(small(phone_ids), full(phone_ids), atol=ATOL, rtol=0)


def test_merges_do_not_accumulate_and_the_pretrained_weights_stay(sensor_x: torch.Tensor) -> None:
    from federation.model.backbones import _text_backbone_prototype

    small = build_task_model("sensor", LORA, SEED, rank=2)
    full = build_task_model("sensor", LORA, SEED)
    pristine = {k: t.pristine.clone() for k, t in small._tails.items()}
    for seed in (1, 2, 3):  # three rounds: each message re-merges from the pretrained weights
        small.load_shared_state(_random_state(small, seed))
    last = _random_state(small, 3)
    full.load_shared_state(last)
    with torch.no_grad():
        torch.testing.assert_close(small(sensor_x), full(sensor_x), atol=ATOL, rtol=0)
    assert all(torch.equal(t.pristine, pristine[k]) for k, t in small._tails.items())
    # a text model's pretrained weights are the process's one MiniLM, untouched by merges
    phone = build_task_model("phone", LORA, SEED, rank=2)
    phone.load_shared_state(_random_state(phone, 4))
    proto = dict(_text_backbone_prototype().named_parameters())
    for tail in phone._tails.values():
        assert any(
            tail.pristine is p.data or tail.pristine.data_ptr() == p.data_ptr() for p in proto.values()
        )
        assert not torch.equal(tail.base.weight, tail.pristine)  # the merged copy is the layer's own


# --- what a rank-r device trains ----------------------------------------------------------------


@pytest.mark.parametrize(("task", "rank"), [("sensor", 2), ("phone", 2), ("phone", 8)])
def test_only_the_first_r_columns_of_b_and_the_head_are_trained(task: str, rank: int) -> None:
    model = build_task_model(task, LORA, SEED, rank=rank)
    trainable = _trainable(model)
    lora = {n: s for n, s in trainable.items() if ".lora_B." in n}
    head = {n for n in trainable if n.startswith("head.")}
    assert set(trainable) == set(lora) | head
    assert head == {f"head.{n}" for n, _ in model.head.named_parameters()}
    assert lora and all(s[1] == rank for s in lora.values())
    n_b = sum(int(np.prod(s)) for s in lora.values())
    per_column = {"phone": 12 * 384, "sensor": 64 + 64 + 64}[task]
    assert n_b == rank * per_column
    # the optimizers hold those parameters, and state the size of those parameters, only
    settings = TrainSettings(steps=1, batch_size=2)
    optimizers = _optimizers(model, settings)
    if task == "phone":
        loss = phone_loss(model, torch.randint(1000, 5000, (2, 8)))[0]  # type: ignore[arg-type]
    else:
        loss = model(torch.randn(2, 6, 100)).logsumexp(-1).mean()
    _step(optimizers, loss)
    # (LoRA-FA keys its state by LoRA module and keeps the moments of B: exp_avg_B [out, r])
    shapes = set(lora.values()) | {tuple(p.shape) for p in model.head.parameters()}
    states = [st for opt in optimizers for st in opt.state.values()]
    assert len(states) == len(lora) + len(head)
    for st in states:
        for value in st.values():
            if torch.is_tensor(value) and value.ndim:
                assert tuple(value.shape) in shapes, tuple(value.shape)


# --- what a device uploads, and the server's sum ------------------------------------------------


def test_a_rank_2_sensor_returns_a_delta_padded_with_zeros() -> None:
    run = RunConfig.parse({"scenario": "smoke", "local-steps": 3})
    device = Device("sensor", all_data_clients("sensor")[0], "low")
    assert device.rank == 2
    global_state = _random_state(build_task_model("sensor", LORA, SEED), seed=5)
    result = local_train(run, device, load_device_data(device, run.seed), global_state, 1)
    assert result.rank == 2
    for key, delta in result.delta.items():
        assert delta.shape == global_state[key].shape
        if is_column_key(key):
            assert np.abs(delta[:, :2]).max() > 0, key
            assert not delta[:, 2:].any(), key  # exactly zero: the device holds nothing there
    contrib = exact_mixed_rank.contribution(result.delta, result.metrics["num-examples"], rank=result.rank)
    shapes = {k: v.shape for k, v in global_state.items()}
    assert exact_mixed_rank.validate_contribution(contrib, shapes, run.max_weight) is None


def test_three_phones_of_ranks_2_4_8_aggregate_to_the_column_block_rule() -> None:
    """End to end in one process: one round of a low (2), mid (4) and high (8) tier phone."""
    run = RunConfig.parse({"scenario": "smoke", "local-steps": 2})
    clients = all_data_clients("phone")
    devices = [Device("phone", clients[i], tier) for i, tier in ((3, "low"), (40, "mid"), (90, "high"))]
    assert [d.rank for d in devices] == [2, 4, 8]
    full = build_task_model("phone", run.lora, run.seed)
    global_state = _random_state(full, seed=6, scale=0.02)
    state = exact_mixed_rank.init()
    adapters, weights = [], []
    for device in devices:
        result = local_train(run, device, load_device_data(device, run.seed), dict(global_state), 1)
        assert result.rank == device.rank
        weight = result.metrics["num-examples"]
        exact_mixed_rank.add(state, exact_mixed_rank.contribution(result.delta, weight, rank=result.rank))
        adapters.append({k: global_state[k].astype(np.float64) + d for k, d in result.delta.items()})
        weights.append(weight)
    new = exact_mixed_rank.apply(state, global_state)

    a_of = {
        n.removeprefix("base_model.model.").replace(".lora_A.default.weight", ""): p.detach().double().numpy()
        for n, p in full.backbone.named_parameters()
        if ".lora_A." in n
    }
    keys = [k for k in global_state if is_column_key(k)]
    assert len(keys) == 12
    for key in keys:
        a = a_of[key.removeprefix("lora.").replace(".lora_B.weight", "")]
        for lo, hi in ((0, 2), (2, 4), (4, 8)):
            trainers = [
                (b[key], w) for b, w, d in zip(adapters, weights, devices, strict=True) if d.rank >= hi
            ]
            expected = sum(w * b[:, lo:hi] @ a[lo:hi] for b, w in trainers) / sum(w for _, w in trainers)
            got = new[key][:, lo:hi].astype(np.float64) @ a[lo:hi]
            np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)
        # and the column blocks really differ: rank 8 moved columns 4..7 alone
        assert np.abs(new[key][:, 4:] - global_state[key][:, 4:]).max() > 0
    # the heads: the weighted mean over the three
    total = sum(weights)
    for key in (k for k in global_state if k.startswith("head.")):
        mean = sum(w * b[key] for b, w in zip(adapters, weights, strict=True)) / total
        np.testing.assert_allclose(new[key], mean, atol=1e-6, rtol=1e-5)
    assert set(task_slice({f"phone/{k}": v for k, v in new.items()}, "phone")) == set(global_state)
