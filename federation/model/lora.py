r"""LoRA adapters via peft, with the down-projection A shared and frozen, at any rank <= r_max.

A is generated from the run's seed (as in FFA-LoRA, Sun et al., ICLR 2024), so the server and
every device build the same A without sending it, and only B is trained and uploaded. Then a
weighted sum of the devices' B is exactly the weighted sum of their updates dW_k = B_k A:
sum_k p_k B_k A = (sum_k p_k B_k) A, which is what secure aggregation (a sum) can compute.
Averaging A and B separately (FedIT) is not the average of the products.

Mixed ranks (docs/architecture.md, "LoRA aggregation"). The global adapter has r_max columns of B and
r_max rows of A. A device of rank r holds a peft LoRA of rank r: A = the first r rows of the
shared A (drawn at r_max, then sliced, so every rank sees the same rows), B = the first r
columns of the global B, and the rest of the global adapter, B[:, r:] A[r:] times the scaling,
merged into its frozen base weight (`split_for_rank`). It computes exactly what the r_max model
computes, but holds parameters, gradients and optimizer state for only its r columns. Every
rank uses one scaling, alpha / r_max (`peft_alpha`), else the same column would mean different
updates on different devices.

B is trained with peft's LoRA-FA optimizer (Zhang et al., 2023), which freezes A and projects
B's gradient so that the step approximates a full-LoRA step (docs/architecture.md: preferred).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from federation.data.common import stable_seed
from federation.defaults import run_default


@dataclass(frozen=True)
class LoraSettings:
    """How a backbone is adapted. `rank` is r_max, the global adapter's width; one scaling
    (alpha / r_max) for every device, whatever its own rank."""

    rank: int = field(default_factory=lambda: run_default("lora-rank"))
    alpha: int = field(default_factory=lambda: run_default("lora-alpha"))
    targets: tuple[str, ...] = field(
        default_factory=lambda: tuple(t.strip() for t in run_default("lora-targets").split(",") if t.strip())
    )
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("lora targets must name at least one module")


def peft_alpha(rank: int, r_max: int, alpha: float) -> float:
    """`lora_alpha` for a rank-`rank` peft adapter so that its scaling alpha'/rank is alpha/r_max."""
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank must lie in 1..{r_max}, got {rank}")
    return alpha * rank / r_max


def wrap_with_lora(
    backbone: nn.Module, settings: LoraSettings, seed: int, name: str, rank: int | None = None
) -> nn.Module:
    """peft-wrap `backbone` at `rank` (default r_max = `settings.rank`); B starts at zero.

    Every lora_A is the first `rank` rows of the shared frozen A, which is drawn at r_max from
    (seed, name, module), so the rows are the same whatever the device's rank.
    """
    from peft import LoraConfig, get_peft_model

    r_max = settings.rank
    rank = r_max if rank is None else rank
    config = LoraConfig(
        r=rank,
        lora_alpha=peft_alpha(rank, r_max, settings.alpha),
        target_modules=list(settings.targets),
        lora_dropout=settings.dropout,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 a deprecated question; nothing for a user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(backbone, config)
    for layer_name, layer in lora_layers(model).items():
        weight = layer.lora_A["default"].weight
        weight.data.copy_(shared_a(seed, name, layer_name, layer, r_max)[:rank])
        weight.requires_grad_(False)
    return model


def shared_a(seed: int, name: str, layer_name: str, layer: nn.Module, r_max: int) -> torch.Tensor:
    """The whole shared frozen A (r_max rows) of one LoRA layer of model `name` (e.g. "phone")."""
    shape = tuple(layer.lora_A["default"].weight.shape[1:])
    return frozen_a(seed, f"{name}:{layer_name}.lora_A.default", (r_max, *shape))


def frozen_a(seed: int, key: str, shape: Sequence[int]) -> torch.Tensor:
    """Deterministic lora_A: peft's default init (kaiming-uniform, a=sqrt(5)) from (seed, key).

    Called with the r_max shape; a device of rank r uses the first r rows. A private generator
    is used: the global RNG is untouched.
    """
    gen = torch.Generator().manual_seed(stable_seed("lora-A", seed, key))
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5) reduces to 1/sqrt(fan_in)
    return (torch.rand(tuple(shape), generator=gen) * 2.0 - 1.0) * bound


def lora_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The weight change B A of one adapter, in the shape of the base layer's weight.

    Linear: B [out, r], A [r, in] -> [out, in]. Conv1d: B [out, r, 1] (a 1-wide conv), A
    [r, in, k] -> [out, in, k] (peft's LoRA conv: A convolves, B mixes channels).
    """
    if b.ndim not in (2, 3) or (b.ndim == 3 and b.shape[2] != 1) or b.shape[1] != a.shape[0]:
        raise ValueError(f"cannot multiply LoRA B {tuple(b.shape)} by A {tuple(a.shape)}")
    return torch.einsum("or,r...->o...", b.reshape(b.shape[0], b.shape[1]), a)


def split_for_rank(
    b_global: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a device of rank `rank` trains and what it freezes: (B[:, :r], A[:r], B[:, r:] A[r:]).

    The third term is the rest of the global adapter, to be merged (times the LoRA scaling)
    into the device's frozen base weight, so the device computes with the full global adapter
    while holding parameters and optimizer state for only its r columns. Since B A is the sum
    of the column outer products, B[:, :r] A[:r] + B[:, r:] A[r:] = B A exactly.
    """
    r_max = a.shape[0]
    if b_global.ndim not in (2, 3) or b_global.shape[1] != r_max or not 1 <= rank <= r_max:
        raise ValueError(
            f"need B with {r_max} columns and 1 <= rank <= {r_max}, got {tuple(b_global.shape)}, {rank}"
        )
    return b_global[:, :rank].clone(), a[:rank].clone(), lora_product(b_global[:, rank:], a[rank:])


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA-wrapped layers of `model`, by module path."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_b_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable B matrices, by a stable name (peft's module path)."""
    return {n: p for n, p in model.named_parameters() if ".lora_B." in n}
