"""LoRA adapters via peft, with the down-projection A shared and frozen.

A is generated from the run's seed (as in FFA-LoRA, Sun et al., ICLR 2024), so the server and
every device build the same A without sending it, and only B is trained and uploaded. Then a
weighted sum of the devices' B is exactly the weighted sum of their updates dW_k = B_k A:
sum_k p_k B_k A = (sum_k p_k B_k) A, which is what secure aggregation (a sum) can compute.
Averaging A and B separately (FedIT) is not the average of the products.

B is trained with peft's LoRA-FA optimizer (Zhang et al., 2023), which freezes A and projects
B's gradient so that the step approximates a full-LoRA step (DESIGN.md: prefer it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from federation.data.common import stable_seed


@dataclass(frozen=True)
class LoraSettings:
    """How a backbone is adapted. One scaling (alpha / rank) for every device."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("lora targets must name at least one module")


def wrap_with_lora(backbone: nn.Module, settings: LoraSettings, seed: int, name: str) -> nn.Module:
    """peft-wrap `backbone`, set every lora_A from the seed and freeze it; B starts at zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.targets),
        lora_dropout=settings.dropout,
        bias="none",
    )
    model = get_peft_model(backbone, config)
    for module_name, module in model.named_modules():
        if module_name.endswith("lora_A.default"):
            weight = module.weight
            weight.data.copy_(frozen_a(seed, f"{name}:{module_name}", tuple(weight.shape)))
            weight.requires_grad_(False)
    return model


def frozen_a(seed: int, key: str, shape: Sequence[int]) -> torch.Tensor:
    """Deterministic lora_A: peft's default init (kaiming-uniform, a=sqrt(5)) from (seed, key)."""
    gen = torch.Generator().manual_seed(stable_seed("lora-A", seed, key))
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5) reduces to 1/sqrt(fan_in)
    return (torch.rand(tuple(shape), generator=gen) * 2.0 - 1.0) * bound


def lora_b_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable B matrices, by a stable name (peft's module path)."""
    return {n: p for n, p in model.named_parameters() if ".lora_B." in n}
