"""The edge model: one small model per task, all built from frozen shared backbones.

- phone (next-token prediction): MiniLM + LoRA, run with a causal attention mask, and a head
  tied to the backbone's frozen word embeddings (a BERT-style transform + a vocabulary bias),
  so the head stays small (~180k parameters) although the vocabulary has 30,522 entries.
- tv (will this viewer like this title): MiniLM + LoRA encodes the title + genres text; an item
  tower maps it to an item vector and bias. The viewer's own vector and bias are a **private**
  part: trained and kept on the device, never uploaded (federated collaborative filtering,
  Ammad-ud-din et al., 2019). The server only ever holds the item/text side.
- sensor (exercise recognition): the compact pretrained IMU encoder + LoRA and a linear head.

The *shared state* of a task is a flat dict of named arrays: its LoRA B matrices
(`lora.<module path>`, r_max columns) and head parameters (`head.<name>`). A is not part of it:
it is derived from the run seed (see `federation.model.lora`). A task model may be built at a
device's own rank r <= r_max: it reads and writes the same r_max-wide shared state, trains only
the first r columns of each B, and holds the other r_max - r merged into frozen weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from federation.data.common import stable_seed
from federation.model.lora import (
    LoraSettings,
    lora_b_parameters,
    lora_layers,
    lora_product,
    shared_a,
    wrap_with_lora,
)

TASKS: tuple[str, ...] = ("phone", "tv", "sensor")
TEXT_HIDDEN = 384
SENSOR_LORA_TARGETS: tuple[str, ...] = ("conv2", "conv3", "proj")


def _shared_key(param_name: str) -> str:
    # peft's names carry "base_model.model." and the adapter name; the short key is stable
    # across peft versions and readable in checkpoints.
    return "lora." + param_name.removeprefix("base_model.model.").replace(".default", "")


@dataclass
class _Tail:
    """The columns r..r_max of one global adapter that a rank-r model holds frozen (merged)."""

    base: nn.Module  # the wrapped layer: weight = pristine + scaling * B[:, r:] A[r:]
    pristine: torch.Tensor  # the pretrained weight, never written (shared across models)
    a: torch.Tensor  # A[r:], frozen
    b: torch.Tensor  # the global B[:, r:] last loaded
    scaling: float


class TaskModel(nn.Module):
    """Common plumbing: a peft-wrapped backbone (`self.backbone`) and a head (`self.head`).

    `rank` is the number of B columns this model trains, `r_max` the global adapter's.
    """

    task: str
    backbone: nn.Module
    head: nn.Module
    rank: int
    r_max: int

    def _init_rank(self, lora: LoraSettings, seed: int, rank: int) -> None:
        """After `self.backbone` is wrapped at `rank`: set up the frozen tail of each adapter.

        Each wrapped layer of a rank-r model (r < r_max) gets its own copy of its base weight,
        into which the global tail is merged on every `load_shared_state`; the pretrained
        weight itself is kept (once per process: it is the shared backbone's) and never
        written, so merges do not accumulate.
        """
        self.rank, self.r_max = rank, lora.rank
        self._tails: dict[str, _Tail] = {}
        if rank == lora.rank:
            return
        for layer_name, layer in lora_layers(self.backbone).items():
            key = _shared_key(f"{layer_name}.lora_B.default.weight")
            b = layer.lora_B["default"].weight
            base = layer.get_base_layer()
            pristine = base.weight.detach()
            base.weight = nn.Parameter(pristine.clone(), requires_grad=False)
            self._tails[key] = _Tail(
                base=base,
                pristine=pristine,
                a=shared_a(seed, self.task, layer_name, layer, lora.rank)[rank:],
                b=torch.zeros((b.shape[0], lora.rank - rank, *b.shape[2:]), dtype=b.dtype),
                scaling=float(layer.scaling["default"]),
            )

    def _lora_params(self) -> dict[str, nn.Parameter]:
        return {_shared_key(n): p for n, p in lora_b_parameters(self.backbone).items()}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """What this model trains of the shared state, by key: B[:, :rank] of each adapter + head."""
        params = self._lora_params()
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return params

    def shared_state(self) -> dict[str, np.ndarray]:
        """The shared state this model computes with: each B r_max wide (trained + frozen tail)."""
        state = {}
        for key, param in self.shared_parameters().items():
            value = param.detach().cpu()
            if key in self._tails:
                value = torch.cat([value, self._tails[key].b], dim=1)
            state[key] = value.numpy().copy()
        return state

    def shared_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the shared state (B with r_max columns), whatever this model's rank."""
        shapes = {key: tuple(p.shape) for key, p in self.shared_parameters().items()}
        for key in self._lora_params():
            shapes[key] = (shapes[key][0], self.r_max, *shapes[key][2:])
        return shapes

    def load_shared_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set the shared parameters (and merge each B's frozen tail); keys and shapes must match."""
        params, shapes = self.shared_parameters(), self.shared_shapes()
        missing, extra = set(params) - set(state), set(state) - set(params)
        if missing or extra:
            raise ValueError(
                f"{self.task} state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        for key, expected in shapes.items():  # check everything before changing anything
            shape = tuple(np.shape(state[key]))
            if shape != expected:
                raise ValueError(f"{self.task} state {key}: shape {shape} != {expected}")
        with torch.no_grad():
            for key, param in params.items():
                value = torch.as_tensor(np.asarray(state[key]), dtype=param.dtype)
                tail = self._tails.get(key)
                if tail is None:
                    param.copy_(value)
                    continue
                param.copy_(value[:, : self.rank])
                tail.b = value[:, self.rank :].clone()
                merged = tail.pristine + tail.scaling * lora_product(tail.b, tail.a).to(tail.pristine.dtype)
                tail.base.weight.copy_(merged)

    def export_adapter(self, directory: Path) -> None:
        """Save the LoRA adapter in PEFT format (loads with `PeftModel.from_pretrained`).

        Its `base_model_name_or_path` is the backbone's public id (MiniLM's Hub id; None for the
        sensor's IMU encoder, which ships with fedge), never a folder of this machine.
        """
        if self.rank != self.r_max:
            raise ValueError(f"export the r_max = {self.r_max} model, not a rank-{self.rank} one")
        # Embeddings are frozen and never a LoRA target: saying so spares peft its check of the
        # backbone's vocabulary, which would look the public id up on the Hub if not offline.
        self.backbone.save_pretrained(str(directory), save_embedding_layers=False)


class PhoneModel(TaskModel):
    """Next-token prediction with a causal MiniLM and an embedding-tied head."""

    task = "phone"

    def __init__(self, lora: LoraSettings, seed: int, rank: int | None = None) -> None:
        super().__init__()
        from federation.model.backbones import load_text_backbone

        rank = lora.rank if rank is None else rank
        backbone = load_text_backbone(share_frozen=True)
        self.backbone = wrap_with_lora(backbone, lora, seed, "phone", rank)
        self._init_rank(lora, seed, rank)
        self.head = nn.ModuleDict(
            {
                "dense": nn.Linear(TEXT_HIDDEN, TEXT_HIDDEN),
                "norm": nn.LayerNorm(TEXT_HIDDEN, eps=1e-12),
            }
        )
        vocab = backbone.config.vocab_size
        self.head.register_parameter("bias", nn.Parameter(torch.zeros(vocab)))
        _seeded_init(self.head, seed, "phone-head")

    def word_embeddings(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight  # frozen, tied

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] for the token after each position (causal: no peeking)."""
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        # Right padding only: with a causal mask no real token attends to a pad.
        mask = causal[None, None].expand(input_ids.shape[0], 1, length, length)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        h = self.head["norm"](nn.functional.gelu(self.head["dense"](hidden)))
        return h @ self.word_embeddings().T + self.head.bias


class TVModel(TaskModel):
    """Liked-or-not: shared text/item side; the viewer's part is passed in (private)."""

    task = "tv"

    def __init__(self, lora: LoraSettings, seed: int, user_dim: int = 16, rank: int | None = None) -> None:
        super().__init__()
        from federation.model.backbones import load_text_backbone

        rank = lora.rank if rank is None else rank
        self.user_dim = user_dim
        self.backbone = wrap_with_lora(load_text_backbone(share_frozen=True), lora, seed, "tv", rank)
        self._init_rank(lora, seed, rank)
        self.head = nn.ModuleDict({"item": nn.Linear(TEXT_HIDDEN, user_dim + 1)})
        self.head.register_parameter("global_bias", nn.Parameter(torch.zeros(1)))
        _seeded_init(self.head, seed, "tv-head")

    def item_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, user_dim + 1]: item vector and item bias from the title + genres text."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head["item"](pooled)

    def score(self, items: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """Logit of "liked" given item embeddings [N, d+1] and the private user part [d+1]."""
        return items[:, :-1] @ user[:-1] + items[:, -1] + user[-1] + self.head.global_bias

    def new_private(self, client_id: str, seed: int) -> torch.Tensor:
        """A viewer's fresh private part: a small random vector and a zero bias."""
        gen = torch.Generator().manual_seed(stable_seed("tv-private", seed, client_id))
        user = torch.zeros(self.user_dim + 1)
        user[:-1] = 0.1 * torch.randn(self.user_dim, generator=gen)
        return user


class SensorModel(TaskModel):
    """Exercise recognition: pretrained IMU encoder + LoRA, linear head."""

    task = "sensor"

    def __init__(self, lora: LoraSettings, seed: int, n_classes: int = 7, rank: int | None = None) -> None:
        super().__init__()
        from federation.model.imu import FEATURES, load_imu_encoder

        rank = lora.rank if rank is None else rank
        settings = LoraSettings(rank=lora.rank, alpha=lora.alpha, targets=SENSOR_LORA_TARGETS)
        self.backbone = wrap_with_lora(load_imu_encoder(), settings, seed, "sensor", rank)
        self._init_rank(settings, seed, rank)
        # The frozen encoder's features are large (tens) and uncalibrated for a fresh head:
        # normalising them first keeps the first rounds' logits sane.
        self.head = nn.ModuleDict({"norm": nn.LayerNorm(FEATURES), "out": nn.Linear(FEATURES, n_classes)})
        _seeded_init(self.head, seed, "sensor-head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head["out"](self.head["norm"](self.backbone(x)))


def _seeded_init(module: nn.Module, seed: int, key: str) -> None:
    """Re-initialise a module's parameters deterministically (same on server and devices)."""
    gen = torch.Generator().manual_seed(stable_seed(key, seed))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.copy_(torch.ones_like(p) if "norm.weight" in name else torch.zeros_like(p))
            else:
                bound = 1.0 / np.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def build_task_model(
    task: str, lora: LoraSettings, seed: int, tv_user_dim: int = 16, rank: int | None = None
) -> TaskModel:
    """A fresh task model at the pretrained start (B = 0, seeded heads).

    `rank`: the columns of each B it trains (default: all, r_max = `lora.rank`); its shared
    state is r_max wide either way.
    """
    rank = lora.rank if rank is None else rank
    if not 1 <= rank <= lora.rank:
        raise ValueError(f"a task model's rank must lie in 1..{lora.rank} (r_max), got {rank}")
    if task == "phone":
        return PhoneModel(lora, seed, rank)
    if task == "tv":
        return TVModel(lora, seed, tv_user_dim, rank)
    if task == "sensor":
        return SensorModel(lora, seed, rank=rank)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def cached_task_model(
    task: str, lora: LoraSettings, seed: int, tv_user_dim: int = 16, rank: int | None = None
) -> TaskModel:
    """One task model per process, setting and rank; callers load the round's shared state into it."""
    return _cached_task_model(task, lora, seed, tv_user_dim, lora.rank if rank is None else rank)


@functools.lru_cache(maxsize=16)  # 3 tasks x a few ranks
def _cached_task_model(task: str, lora: LoraSettings, seed: int, tv_user_dim: int, rank: int) -> TaskModel:
    return build_task_model(task, lora, seed, tv_user_dim, rank)


def initial_state(
    tasks: tuple[str, ...], lora: LoraSettings, seed: int, tv_user_dim: int = 16
) -> dict[str, np.ndarray]:
    """The global shared state at round 0, keys prefixed by task (`phone/lora....`)."""
    state: dict[str, np.ndarray] = {}
    for task in tasks:
        fresh = build_task_model(task, lora, seed, tv_user_dim).shared_state()
        state.update({f"{task}/{k}": v for k, v in fresh.items()})
    return state


def task_slice(state: Mapping[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """The part of a global state that belongs to one task, with the task prefix removed."""
    prefix = f"{task}/"
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
