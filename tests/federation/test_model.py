"""The edge model (`federation.model`): offline backbone, frozen seeded A, B = 0 start, lossless
shared state through Flower records, and PEFT export that plain `peft` loads and reproduces.

MiniLM is read from disk once for this module (the `backbone` fixture); every model built here
is a copy of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.serde import array_record_from_proto, array_record_to_proto

from federation.config import RunConfig
from federation.model import backbones
from federation.model.edge import TaskModel, build_task_model, task_slice
from federation.model.lora import LoraSettings, frozen_a
from federation.tasks.phone import PhoneModel
from federation.tasks.sensor import SensorModel

SEED = 0
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply this morning.",
]


@pytest.fixture(scope="module")
def backbone():
    """MiniLM + tokenizer, loaded from the installed package with the Hub switched off."""
    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        # load here, in offline mode, even if another test module already filled the process cache
        backbones._text_backbone_prototype.cache_clear()
        backbones.text_tokenizer.cache_clear()
        model = backbones._text_backbone_prototype()
        tokenizer = backbones.text_tokenizer()
    return model, tokenizer


@pytest.fixture(scope="module")
def batch(backbone) -> dict[str, torch.Tensor]:
    _, tokenizer = backbone
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def fresh_phone(backbone) -> PhoneModel:
    """Never modified by any test."""
    model = build_task_model("phone", LoraSettings(), SEED)
    assert isinstance(model, PhoneModel)
    return model


@pytest.fixture(scope="module")
def phone_pair(backbone) -> tuple[PhoneModel, PhoneModel]:
    """Two more phone models of the same seed, for tests that change their shared state."""
    return build_task_model("phone", LoraSettings(), SEED), build_task_model("phone", LoraSettings(), SEED)  # type: ignore[return-value]


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (how all-MiniLM-L6-v2 is meant to be used)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _randomize(model: TaskModel, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.shared_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _lora_a(model: TaskModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.backbone.named_parameters() if ".lora_A." in n}


# ---------------------------------------------------------------------------------- backbone


def test_backbone_loads_offline_and_embeds_sentences(backbone, batch) -> None:
    model, tokenizer = backbone
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        6,
        384,
        30522,
    )
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000  # 22.7M without pooler
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.tokenize("Hello World") == ["hello", "world"]  # uncased WordPiece

    emb = _embed(model, batch)
    assert emb.shape == (3, 384) and torch.isfinite(emb).all()
    cos = emb @ emb.T
    torch.testing.assert_close(cos.diagonal(), torch.ones(3), atol=1e-5, rtol=0)
    assert cos[0, 2] < 0.5  # different sentences, different vectors
    assert cos[0, 1] > cos[0, 2] + 0.2  # and pretrained: the two guitar sentences are closer

    # the same sentence alone (no padding) embeds the same as inside the padded batch
    alone = tokenizer(SENTENCES[:1], return_tensors="pt")
    one = _embed(model, {"input_ids": alone["input_ids"], "attention_mask": alone["attention_mask"]})
    assert float(one[0] @ emb[0]) == pytest.approx(1.0, abs=1e-5)


def test_load_text_backbone_gives_independent_copies(backbone) -> None:
    proto, _ = backbone
    a, b = backbones.load_text_backbone(), backbones.load_text_backbone()
    assert a is not proto and a is not b
    w = "embeddings.word_embeddings.weight"
    assert torch.equal(a.state_dict()[w], proto.state_dict()[w])
    assert a.state_dict()[w].data_ptr() != proto.state_dict()[w].data_ptr()


# ------------------------------------------------------------------------------- frozen A, B


def test_frozen_a_is_seeded_identical_across_builds_and_not_trainable(fresh_phone, phone_pair) -> None:
    a_fresh, a_other = _lora_a(fresh_phone), _lora_a(phone_pair[0])
    assert len(a_fresh) == 12  # 6 layers x (query, value)
    assert a_fresh.keys() == a_other.keys()
    for name, param in a_fresh.items():
        assert torch.equal(param, a_other[name])
        assert not param.requires_grad
        assert param.shape == (8, 384)
        # A is a pure function of (seed, module): the server never has to send it
        module = name.removesuffix(".weight")
        assert torch.equal(param, frozen_a(SEED, f"phone:{module}", tuple(param.shape)))
        assert not torch.equal(param, frozen_a(SEED + 1, f"phone:{module}", tuple(param.shape)))
    # not one matrix reused everywhere
    values = list(a_fresh.values())
    assert not torch.equal(values[0], values[1])
    # trainable = B + head; the backbone itself is frozen
    trainable = {n for n, p in fresh_phone.named_parameters() if p.requires_grad}
    expected = {f"backbone.{n}" for n, p in fresh_phone.backbone.named_parameters() if ".lora_B." in n}
    expected |= {f"head.{n}" for n, _ in fresh_phone.head.named_parameters()}
    assert trainable == expected


def test_frozen_a_differs_across_seeds_and_tasks() -> None:
    s0, s0_again, s1 = (build_task_model("sensor", LoraSettings(), s) for s in (0, 0, 1))
    a0, a0_again, a1 = _lora_a(s0), _lora_a(s0_again), _lora_a(s1)
    assert len(a0) == 3  # conv2, conv3, proj
    for name in a0:
        assert torch.equal(a0[name], a0_again[name])
        assert not torch.equal(a0[name], a1[name])
        assert not a0[name].requires_grad
    # the seeded heads differ across seeds too, and are reproducible
    assert torch.equal(s0.head["classes"].weight, s0_again.head["classes"].weight)
    assert not torch.equal(s0.head["classes"].weight, s1.head["classes"].weight)


def test_b_starts_at_zero_so_a_fresh_phone_is_the_plain_backbone(backbone, fresh_phone, batch) -> None:
    plain, _ = backbone
    b = {n: p for n, p in fresh_phone.backbone.named_parameters() if ".lora_B." in n}
    assert len(b) == 12 and all(p.requires_grad and not p.any() for p in b.values())
    with torch.no_grad():
        expected = plain(**batch).last_hidden_state
        got = fresh_phone.backbone(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # the shared state is exactly B + head
    shapes = fresh_phone.shared_shapes()
    assert sum(k.startswith("lora.") for k in shapes) == 12
    assert {k for k in shapes if k.startswith("head.")} == {
        "head.dense.weight",
        "head.dense.bias",
        "head.norm.weight",
        "head.norm.bias",
        "head.bias",
    }
    assert shapes["head.bias"] == (30522,)
    assert shapes["lora.encoder.layer.0.attention.self.query.lora_B.weight"] == (384, 8)


# ----------------------------------------------------------------------------- shared state


def test_shared_state_through_flower_records_is_lossless(phone_pair, batch) -> None:
    sender, receiver = phone_pair
    _randomize(sender, seed=1)
    state = sender.shared_state()
    record = ArrayRecord({k: Array(v) for k, v in state.items()})
    # and through the wire format Flower sends (protobuf)
    wire = array_record_from_proto(array_record_to_proto(record))
    back = {k: v.numpy() for k, v in wire.items()}
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype == np.float32 and back[key].shape == value.shape
        assert back[key].tobytes() == value.tobytes(), key

    _randomize(receiver, seed=2)
    receiver.load_shared_state(back)
    restored = receiver.shared_state()
    assert all(restored[k].tobytes() == state[k].tobytes() for k in state)
    # B + head are all a device needs: same seed -> same A -> the very same model
    ids = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(receiver(ids), sender(ids))


def test_load_shared_state_rejects_wrong_keys_and_shapes(phone_pair) -> None:
    model = phone_pair[1]
    good = model.shared_state()
    key = "lora.encoder.layer.3.attention.self.value.lora_B.weight"
    missing = {k: v for k, v in good.items() if k != key}
    extra = {**good, "head.surprise": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"missing .*value\.lora_B"):
        model.load_shared_state(missing)
    with pytest.raises(ValueError, match=r"head\.surprise"):
        model.load_shared_state(extra)
    for bad_shape in (np.zeros((8, 384), np.float32), np.zeros((384, 4), np.float32)):
        with pytest.raises(ValueError, match=rf"{key}: shape"):
            model.load_shared_state({**good, key: bad_shape})
    after = model.shared_state()
    assert all(after[k].tobytes() == good[k].tobytes() for k in good)


# -------------------------------------------------------------------------------- PEFT export


def test_exported_phone_adapter_loads_with_plain_peft_and_reproduces(
    backbone, phone_pair, batch, tmp_path: Path
) -> None:
    from peft import PeftModel

    plain, _ = backbone
    model = phone_pair[0]
    _randomize(model, seed=3, scale=0.1)  # non-zero B
    model.export_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"query", "value"}

    base = backbones.load_text_backbone()  # a fresh, plain MiniLM BertModel
    assert not any("lora" in n for n, _ in base.named_parameters())
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    loaded.eval()
    with torch.no_grad():
        expected = model.backbone(**batch).last_hidden_state
        got = loaded(**batch).last_hidden_state
        untouched = plain(**batch).last_hidden_state
    assert (expected - untouched).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_exported_sensor_adapter_and_head_reproduce_the_eval_metric(backbone, tmp_path: Path) -> None:
    """Through the real exporter (`server.report.export_adapters`) of a real `RunState`."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from federation.data.sensor import N_CLASSES, load_sensor_client
    from federation.metrics import finalize
    from federation.model.imu import FEATURES, load_imu_encoder
    from federation.tasks.sensor import eval_sensor, train_sensor
    from federation.training import TrainSettings
    from server.loop import RunState
    from server.report import export_adapters

    data = load_sensor_client("s3a", SEED)
    trained = build_task_model("sensor", LoraSettings(), SEED)
    assert isinstance(trained, SensorModel)
    train_sensor(trained, data.train_x, data.train_y, TrainSettings(steps=15), seed=0)
    state = trained.shared_state()
    assert all(np.abs(v).max() > 0 for k, v in state.items() if k.startswith("lora."))

    fed = RunState(None, RunConfig.parse({"scenario": "smoke", "out-dir": str(tmp_path / "run")}))  # type: ignore[arg-type]
    assert set(task_slice(fed.state, "sensor")) == set(state)
    fed.state.update({f"sensor/{k}": v for k, v in state.items()})
    export_adapters(fed, tmp_path / "adapter")
    target = tmp_path / "adapter" / "sensor"
    assert {p.name for p in target.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
    }
    for task in ("phone", "tv"):
        assert (tmp_path / "adapter" / task / "head.safetensors").is_file()

    loaded = PeftModel.from_pretrained(load_imu_encoder(), str(target))
    # the documented sensor head: LayerNorm over the encoder's features, then a linear layer
    head = torch.nn.ModuleDict(
        {"norm": torch.nn.LayerNorm(FEATURES), "classes": torch.nn.Linear(FEATURES, N_CLASSES)}
    )
    head.load_state_dict(load_file(str(target / "head.safetensors")))
    loaded.eval()
    with torch.no_grad():
        logits = head["classes"](head["norm"](loaded(data.test_x)))
    pred = logits.argmax(-1)
    confusion = torch.bincount(data.test_y * N_CLASSES + pred, minlength=N_CLASSES**2)
    plain_sums = {
        "loss_sum": float(torch.nn.functional.cross_entropy(logits, data.test_y, reduction="sum")),
        "count": float(len(data.test_y)),
        "correct": float((pred == data.test_y).sum()),
        "confusion": confusion.double().tolist(),
    }
    reference = eval_sensor(trained, data.test_x, data.test_y)
    assert plain_sums["correct"] == reference["correct"]
    assert plain_sums["confusion"] == reference["confusion"]
    assert plain_sums["loss_sum"] == pytest.approx(reference["loss_sum"], rel=1e-5)
    ours, theirs = finalize("sensor", reference), finalize("sensor", plain_sums)
    assert theirs["accuracy"] == ours["accuracy"] and theirs["macro_f1"] == ours["macro_f1"]
    # the adapter is what was exported: without it the features differ
    with torch.no_grad():
        assert (loaded(data.test_x) - load_imu_encoder()(data.test_x)).abs().max() > 1e-3
