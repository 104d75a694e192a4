"""The edge model's task-agnostic part: one small model per task, built on a frozen shared backbone.

`TaskModel` is the plumbing every task's model inherits (a peft-wrapped backbone, a head, the
shared state and mixed ranks); each task defines its own model in its module of
`federation.tasks` (phone: MiniLM with a causal mask and an embedding-tied head; tv: MiniLM item
tower + a private per-viewer part; sensor: the compact IMU encoder). `build_task_model` and
`cached_task_model` look the task up in the registry.

The *shared state* of a task is a flat dict of named arrays: its LoRA B matrices
(`lora.<module path>`, r_max columns) and head parameters (`head.<name>`). A is not part of it:
it is derived from the run seed (see `federation.model.lora`). A task model may be built at a
device's own rank r <= r_max: it reads and writes the same r_max-wide shared state, trains only
the first r columns of each B, and holds the other r_max - r merged into frozen weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
)
from federation.tasks import get_task

if TYPE_CHECKING:
    from federation.config import RunConfig


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


def seeded_init(module: nn.Module, seed: int, key: str) -> None:
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
    task: str, lora: LoraSettings, seed: int, rank: int | None = None, run: RunConfig | None = None
) -> TaskModel:
    """A fresh model of a task (looked up in `federation.tasks`) at the pretrained start (B = 0,
    seeded heads). `rank`: the columns of each B it trains (default: all, r_max = `lora.rank`);
    its shared state is r_max wide either way. `run` carries task settings (None: defaults).
    """
    rank = lora.rank if rank is None else rank
    if not 1 <= rank <= lora.rank:
        raise ValueError(f"a task model's rank must lie in 1..{lora.rank} (r_max), got {rank}")
    return get_task(task).build_model(lora, seed, rank, run)


def cached_task_model(
    task: str, lora: LoraSettings, seed: int, rank: int | None = None, run: RunConfig | None = None
) -> TaskModel:
    """One task model per process, setting and rank; callers load the round's shared state into it.

    Keyed by what the model is built from: task, LoRA settings, seed, rank and the run settings
    the task says it reads (`Task.model_key`)."""
    rank = lora.rank if rank is None else rank
    key = (task, lora, seed, rank, get_task(task).model_key(run))
    model = _MODELS.get(key)
    if model is None:
        if len(_MODELS) >= _MAX_CACHED_MODELS:  # a few tasks x a few ranks per run; drop the oldest
            del _MODELS[next(iter(_MODELS))]
        model = _MODELS[key] = build_task_model(task, lora, seed, rank, run)
    return model


_MODELS: dict[tuple, TaskModel] = {}
_MAX_CACHED_MODELS = 16


def initial_state(
    tasks: tuple[str, ...], lora: LoraSettings, seed: int, run: RunConfig | None = None
) -> dict[str, np.ndarray]:
    """The global shared state at round 0, keys prefixed by task (`phone/lora....`)."""
    state: dict[str, np.ndarray] = {}
    for task in tasks:
        fresh = build_task_model(task, lora, seed, run=run).shared_state()
        state.update({f"{task}/{k}": v for k, v in fresh.items()})
    return state


def task_slice(state: Mapping[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """The part of a global state that belongs to one task, with the task prefix removed."""
    prefix = f"{task}/"
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
