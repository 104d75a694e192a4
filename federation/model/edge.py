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
from federation.rules.base import (
    DEFAULT_ADAPTER,
    Adapter,
    b_key_of,
    is_a_key,
    is_b_key,
    residual_key_of,
)
from federation.tasks import get_task

if TYPE_CHECKING:
    from federation.config import RunConfig


def _shared_key(param_name: str) -> str:
    # peft's names carry "base_model.model." and the adapter name; the short key is stable
    # across peft versions and readable in checkpoints.
    return "lora." + param_name.removeprefix("base_model.model.").replace(".default", "")


@dataclass
class _Frozen:
    """What one wrapped layer holds merged into its frozen weight: the columns r..r_max of the
    global adapter that a rank-r model does not train, and the rule's residual (if any).

    weight = pristine + scaling * (residual + B[:, r:] A[r:]); the tail product is left out
    when the rule drops it (`Adapter.truncate`)."""

    base: nn.Module  # the wrapped layer, whose weight is this model's own copy
    pristine: torch.Tensor  # the pretrained weight, never written (shared across models)
    a: torch.Tensor  # A[r:], frozen: from the seed, or the global state's when the rule shares A
    b: torch.Tensor  # the global B[:, r:] last loaded
    scaling: float
    residual: torch.Tensor | None = None  # the rule's residual R, in the adapter's units (B A)
    drop_tail: bool = False

    def merge(self) -> None:
        change = torch.zeros_like(self.pristine)
        if self.residual is not None:
            change = change + self.residual.to(self.pristine.dtype)
        if not self.drop_tail and self.b.shape[1]:
            change = change + lora_product(self.b, self.a).to(self.pristine.dtype)
        self.base.weight.copy_(self.pristine + self.scaling * change)


class TaskModel(nn.Module):
    """Common plumbing: a peft-wrapped backbone (`self.backbone`) and a head (`self.head`).

    `rank` is the number of B columns this model trains, `r_max` the global adapter's;
    `adapter` how the run's aggregation rule has devices hold the adapter (`configure_adapter`).
    """

    task: str
    backbone: nn.Module
    head: nn.Module
    rank: int
    r_max: int
    adapter: Adapter = DEFAULT_ADAPTER

    def _init_rank(self, lora: LoraSettings, seed: int, rank: int) -> None:
        """After `self.backbone` is wrapped at `rank`: set up the frozen tail of each adapter.

        Each wrapped layer of a rank-r model (r < r_max) gets its own copy of its base weight,
        into which the global tail is merged on every `load_shared_state`; the pretrained
        weight itself is kept (once per process: it is the shared backbone's) and never
        written, so merges do not accumulate.
        """
        self.rank, self.r_max = rank, lora.rank
        self._lora_seed = seed
        self._tails: dict[str, _Frozen] = {}
        if rank == lora.rank:
            return
        for layer_name, layer in lora_layers(self.backbone).items():
            self._freeze(layer_name, layer)

    def _freeze(self, layer_name: str, layer: nn.Module) -> _Frozen:
        """Give one wrapped layer its own base weight and a record of what is merged into it."""
        key = _shared_key(f"{layer_name}.lora_B.default.weight")
        b = layer.lora_B["default"].weight
        base = layer.get_base_layer()
        pristine = base.weight.detach()
        base.weight = nn.Parameter(pristine.clone(), requires_grad=False)
        frozen = self._tails[key] = _Frozen(
            base=base,
            pristine=pristine,
            a=shared_a(self._lora_seed, self.task, layer_name, layer, self.r_max)[self.rank :],
            b=torch.zeros((b.shape[0], self.r_max - self.rank, *b.shape[2:]), dtype=b.dtype),
            scaling=float(layer.scaling["default"]),
        )
        return frozen

    def configure_adapter(self, adapter: Adapter) -> None:
        """Hold the adapter as the run's rule says (once, right after the model is built): train A
        too, carry a residual in every layer's frozen weight, drop the tail beyond the rank."""
        self.adapter = adapter
        for name, param in self.backbone.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(adapter.train_a)
        if adapter.residual:
            for layer_name, layer in lora_layers(self.backbone).items():
                key = _shared_key(f"{layer_name}.lora_B.default.weight")
                frozen = self._tails.get(key) or self._freeze(layer_name, layer)
                frozen.residual = torch.zeros_like(frozen.pristine)
        for frozen in self._tails.values():
            frozen.drop_tail = adapter.truncate

    def _lora_params(self) -> dict[str, nn.Parameter]:
        return {_shared_key(n): p for n, p in lora_b_parameters(self.backbone).items()}

    def _lora_a_params(self) -> dict[str, nn.Parameter]:
        return {_shared_key(n): p for n, p in self.backbone.named_parameters() if ".lora_A." in n}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """What this model trains of the shared state, by key: B[:, :rank] of each adapter (and
        A[:rank] when the rule shares A) + head."""
        params = self._lora_params()
        if self.adapter.train_a:
            params.update(self._lora_a_params())
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return params

    def _residuals(self) -> dict[str, _Frozen]:
        return {residual_key_of(k): f for k, f in self._tails.items() if f.residual is not None}

    def shared_state(self) -> dict[str, np.ndarray]:
        """The shared state this model computes with: each B r_max wide (trained + frozen tail),
        each shared A r_max tall, and each residual."""
        state = {}
        for key, param in self.shared_parameters().items():
            value = param.detach().cpu()
            if is_b_key(key) and key in self._tails:
                value = torch.cat([value, self._tails[key].b], dim=1)
            elif is_a_key(key) and b_key_of(key) in self._tails:
                value = torch.cat([value, self._tails[b_key_of(key)].a], dim=0)
            state[key] = value.numpy().copy()
        for key, frozen in self._residuals().items():
            state[key] = frozen.residual.detach().cpu().numpy().copy()  # type: ignore[union-attr]
        return state

    def shared_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the shared state (B with r_max columns, A with r_max rows), whatever this
        model's rank."""
        shapes = {key: tuple(p.shape) for key, p in self.shared_parameters().items()}
        for key in shapes:
            if is_b_key(key):
                shapes[key] = (shapes[key][0], self.r_max, *shapes[key][2:])
            elif is_a_key(key):
                shapes[key] = (self.r_max, *shapes[key][1:])
        for key, frozen in self._residuals().items():
            shapes[key] = tuple(frozen.pristine.shape)
        return shapes

    def load_shared_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set the shared parameters (and merge each frozen tail and residual); keys and shapes
        must match."""
        params, shapes = self.shared_parameters(), self.shared_shapes()
        missing, extra = set(shapes) - set(state), set(state) - set(shapes)
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
                if is_b_key(key) and key in self._tails:
                    param.copy_(value[:, : self.rank])
                    self._tails[key].b = value[:, self.rank :].clone()
                elif is_a_key(key) and b_key_of(key) in self._tails:
                    param.copy_(value[: self.rank])
                    self._tails[b_key_of(key)].a = value[self.rank :].clone()
                else:
                    param.copy_(value)
            for key, frozen in self._residuals().items():
                frozen.residual = torch.as_tensor(np.asarray(state[key]), dtype=frozen.pristine.dtype).clone()
            for frozen in self._tails.values():
                frozen.merge()

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
        residuals = self._residuals()
        if residuals:  # a rule that merges into the frozen weights: the adapter alone is not the model
            from safetensors.torch import save_file

            save_file(
                {k: (f.scaling * f.residual).contiguous() for k, f in residuals.items()},  # type: ignore[operator]
                str(Path(directory) / "lora_residual.safetensors"),
                metadata={"fedge": "add each tensor to the base weight of its layer (already scaled)"},
            )


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
    model = get_task(task).build_model(lora, seed, rank, run)
    adapter = _adapter(run)
    if adapter != DEFAULT_ADAPTER:
        model.configure_adapter(adapter)
    return model


def _adapter(run: RunConfig | None) -> Adapter:
    """How the run's aggregation rule has the adapter held (None: fedge's default)."""
    return run.rule.adapter if run is not None else DEFAULT_ADAPTER


def cached_task_model(
    task: str, lora: LoraSettings, seed: int, rank: int | None = None, run: RunConfig | None = None
) -> TaskModel:
    """One task model per process, setting and rank; callers load the round's shared state into it.

    Keyed by what the model is built from: task, LoRA settings, seed, rank and the run settings
    the task says it reads (`Task.model_key`)."""
    rank = lora.rank if rank is None else rank
    key = (task, lora, seed, rank, get_task(task).model_key(run), _adapter(run))
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
