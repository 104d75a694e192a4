"""Local optimizers: what a device's training steps update its LoRA matrices and head with.

A device's round starts a fresh optimizer (its state is not kept between rounds: a device of a
cross-device fleet takes part in few of them, and its moments would be stale and private). The
run config's `local-optimizer` names one for every device; a scenario may name another for a
device class (`Scenario.optimizer`, with that class's `lr` and `head_lr`). Looked up by name in
`LOCAL_OPTIMIZERS`; this module imports no torch until a device trains (a scenario checks names
against it in processes that must stay light).

- `adamw`: LoRA-FA for B where A is a matrix (Linear layers; Zhang et al., "LoRA-FA:
  Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning", 2023, peft's
  `create_lorafa_optimizer`), AdamW for B of Conv LoRA and for the heads. A rule that trains A,
  or asks for plain AdamW (`federation.rules.Adapter.lora_fa`), gets AdamW on every LoRA matrix
  it trains.
- `sgd`: plain SGD (no momentum) on the same matrices and the heads: FedAvg's own local step
  (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017; Reddi et al., ICLR 2021, keep it on the devices and put adaptivity on the
  server). For a device that takes a few steps a round: Adam's first step after a restart is
  m/sqrt(v) = g/|g|, a step of lr on every coordinate whatever its gradient, so over many
  short rounds the coordinates whose gradients are only noise random-walk; SGD moves each by
  its gradient (the smart-home TVs, 3 steps a round: docs/results.md).

A builder takes the task model and its `TrainSettings` and returns the optimizers one step
calls in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from federation.model.edge import TaskModel
    from federation.training import TrainSettings

Builder = Callable[["TaskModel", "TrainSettings"], "list[torch.optim.Optimizer]"]


def trained_lora(model: TaskModel) -> list[torch.nn.Parameter]:
    """The LoRA matrices the run's rule trains: B, and A where the rule trains it."""
    return [
        p
        for n, p in model.backbone.named_parameters()
        if ".lora_B." in n or (model.adapter.train_a and ".lora_A." in n)
    ]


def adamw(model: TaskModel, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """LoRA-FA for B where A is a matrix, AdamW for the rest (see the module docstring).

    peft's LoRA-FA projects B's gradient with (A A^T)^-1, written for 2-D A; a Conv1d LoRA's A
    is [r, in, k], so the sensor's B is trained with plain AdamW (A is frozen either way)."""
    import torch
    from peft.optimizers import create_lorafa_optimizer

    head = torch.optim.AdamW(model.head.parameters(), lr=settings.head_lr, weight_decay=0.0)
    linear_a = all(p.ndim == 2 for n, p in model.backbone.named_parameters() if ".lora_A." in n)
    if model.adapter.lora_fa and linear_a:
        config = model.backbone.peft_config["default"]
        lora = create_lorafa_optimizer(
            model.backbone, r=config.r, lora_alpha=config.lora_alpha, lr=settings.lr
        )
    else:  # the rule trains A too or asks for plain AdamW, or A is a Conv LoRA's [r, in, k]
        lora = torch.optim.AdamW(trained_lora(model), lr=settings.lr, weight_decay=0.0)
    return [lora, head]


def sgd(model: TaskModel, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """Plain SGD: the trained LoRA matrices at `lr`, the heads at `head_lr`."""
    import torch

    return [
        torch.optim.SGD(trained_lora(model), lr=settings.lr),
        torch.optim.SGD(model.head.parameters(), lr=settings.head_lr),
    ]


LOCAL_OPTIMIZERS: dict[str, Builder] = {"adamw": adamw, "sgd": sgd}


def check_optimizer(name: object) -> str | None:
    """Why `name` is not a local optimizer, or None."""
    if isinstance(name, str) and name in LOCAL_OPTIMIZERS:
        return None
    return f"must be one of {', '.join(LOCAL_OPTIMIZERS)}, got {name!r}"
