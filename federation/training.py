"""On-device training and evaluation helpers every task uses: plain torch, no Flower.

The local-work settings, the optimizers (by name: `federation.optimizers`), batch sampling, and a
ready classifier trainer / evaluator; each task's own training lives in its module of
`federation.tasks`. Every function takes a task model whose shared state the caller has set, the
device's own data, and explicit settings, and returns plain numbers. Evaluation returns *sums*
(losses, counts, a confusion matrix, score histograms) rather than ratios, so that results from
many devices add up exactly on the server (and could be summed securely); `federation.metrics`
turns sums into accuracy, AUC and macro-F1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from federation.data.common import stable_seed
from federation.defaults import run_default
from federation.lr_schedule import check_final, step_factor
from federation.model.edge import TaskModel
from federation.optimizers import LOCAL_OPTIMIZERS, check_optimizer

AUC_BINS = 200  # histogram bins for the federated AUC: error <= 1/AUC_BINS-ish, summable
EVAL_BATCH = 64


@dataclass(frozen=True)
class TrainSettings:
    """Local work per round (a device budget caps steps and batch); defaults: pyproject.toml's."""

    steps: int
    batch_size: int = field(default_factory=lambda: run_default("batch-size"))
    lr: float = field(default_factory=lambda: run_default("lr"))
    head_lr: float = field(default_factory=lambda: run_default("head-lr"))
    private_lr: float = field(default_factory=lambda: run_default("private-lr"))
    # a personalised task's private fit: sum of log-losses + this x |private vector|^2 (TV)
    private_l2: float = field(default_factory=lambda: run_default("private-l2"))
    # classifiers under label skew (the sensor): FedRS's alpha, see `train_classifier`
    absent_class_scale: float = field(default_factory=lambda: run_default("absent-class-scale"))
    # what the steps update the LoRA matrices and heads with (federation.optimizers)
    optimizer: str = field(default_factory=lambda: run_default("local-optimizer"))
    # `lr` and `head_lr` fall by cosine to this fraction of themselves over the training these
    # settings describe (federation.lr_schedule): over a run's rounds as a class's setting
    # (`RunConfig.train_for`), over one call's steps here (a device's round is one value of the
    # run's curve, `federation.local.device_settings`, and trains at a constant rate: 1)
    lr_final: float = field(default_factory=lambda: run_default("lr-final"))

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"local steps and batch size must be >= 1, got {self.steps}, {self.batch_size}")
        if min(self.lr, self.head_lr, self.private_lr) <= 0:
            raise ValueError("learning rates must be > 0")
        if not self.private_l2 > 0:  # 0 leaves a viewer whose ratings separate with no finite fit
            raise ValueError(f"private-l2 must be > 0, got {self.private_l2}")
        if not 0.0 <= self.absent_class_scale <= 1.0:
            raise ValueError(f"absent-class-scale must be in [0, 1], got {self.absent_class_scale}")
        if (why := check_optimizer(self.optimizer)) is not None:
            raise ValueError(f"local-optimizer {why}")
        if (why := check_final(self.lr_final)) is not None:
            raise ValueError(f"lr-final {why}")


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the local steps
    num_examples: int  # examples seen (steps x batch; phone: sequences): the aggregation weight
    train_seconds: float


def _optimizers(model: TaskModel, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """The device's optimizers for the LoRA matrices and heads: `settings.optimizer`'s builder
    (`federation.optimizers.LOCAL_OPTIMIZERS`)."""
    return LOCAL_OPTIMIZERS[settings.optimizer](model, settings)


def _batches(n: int, settings: TrainSettings, seed: int) -> list[torch.Tensor]:
    """`steps` batches of indices into n examples, sampled without replacement per epoch."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    while len(out) < settings.steps:
        if pos + min(settings.batch_size, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        out.append(order[pos : pos + settings.batch_size])
        pos += settings.batch_size
    return out


def _step(optimizers: list[torch.optim.Optimizer], loss: torch.Tensor) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()


def train_steps(
    model: TaskModel,
    n: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    settings: TrainSettings,
    seed: int,
    *,
    extra_optimizers: Sequence[torch.optim.Optimizer] = (),
    start: float | None = None,
) -> TrainResult:
    """The local training loop every task shares: `settings.steps` steps over batches of indices
    into `n` examples (`_batches`), each minimising `batch_loss(indices)` with the model's LoRA
    and head optimizers (`_optimizers`) and any `extra_optimizers` (a TV's private part).
    `start`: when the device's work began (perf_counter), if before this loop."""
    start = time.perf_counter() if start is None else start
    model.train()
    scheduled = _optimizers(model, settings)
    optimizers = [*scheduled, *extra_optimizers]
    base = [[group["lr"] for group in opt.param_groups] for opt in scheduled]
    losses, seen = [], 0
    for step, idx in enumerate(_batches(n, settings, seed)):
        if settings.lr_final < 1.0:  # the LoRA matrices' and heads' rates only (not a private part's)
            factor = step_factor(step, settings.steps, settings.lr_final)
            for opt, rates in zip(scheduled, base, strict=True):
                for group, lr in zip(opt.param_groups, rates, strict=True):
                    group["lr"] = lr * factor
        loss = batch_loss(idx)
        _step(optimizers, loss)
        losses.append(loss.item())
        seen += len(idx)
    model.eval()
    return TrainResult(float(np.mean(losses)), seen, time.perf_counter() - start)


# -- classifiers (sensor, and tasks from outside fedge) ------------------------------------


def restricted_logits(logits: torch.Tensor, present: torch.Tensor, absent_scale: float) -> torch.Tensor:
    """FedRS's restricted logits: the columns of `logits` [N, C] whose class is not in `present`
    multiplied by `absent_scale` (alpha), the present ones unchanged."""
    scale = torch.full((logits.shape[-1],), absent_scale, dtype=logits.dtype)
    scale[present] = 1.0
    return logits * scale


def train_classifier(
    model: TaskModel,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    label_smoothing: float = 0.0,
    absent_class_scale: float = 1.0,
) -> TrainResult:
    """Local training of a classifier (`model(x)` gives logits) on (x, y): LoRA B + head, cross-entropy.

    `absent_class_scale` (alpha): the logits of the classes absent from the device's own training
    labels are multiplied by alpha before the softmax (restricted softmax, FedRS: Li & Zhan,
    "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data", KDD
    2021; the paper's default alpha is 0.5). 1 is the full softmax. Under label skew a device's
    full softmax pushes down the head rows of every class it never sees, which makes the averaged
    head swing with the round's sample of devices; alpha < 1 lets the absent classes take less
    of the probability (and scales their rows' gradient by alpha, though Adam-style optimizers
    normalise each parameter's step, so the softmax effect is the one that remains) without
    removing them from the softmax, so the present classes are still told apart from them
    (removing them held the smart-home watches near 0.70 accuracy however many took part;
    docs/results.md).
    """
    if not 0.0 <= absent_class_scale <= 1.0:
        raise ValueError(f"absent_class_scale must be in [0, 1], got {absent_class_scale}")
    present = torch.unique(y)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = model(x[idx])
        if absent_class_scale < 1.0:
            logits = restricted_logits(logits, present, absent_class_scale)
        return nn.functional.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)

    return train_steps(model, len(x), batch_loss, settings, seed)


@torch.no_grad()
def eval_classifier(
    model: TaskModel, x: torch.Tensor, y: torch.Tensor, n_classes: int
) -> dict[str, float | list[float]]:
    """Summed held-out results of a classifier: loss sum, count, correct, confusion cells (for macro-F1)."""
    model.eval()
    logits = torch.cat([model(b) for b in x.split(EVAL_BATCH)]) if len(x) else torch.zeros(0, n_classes)
    pred = logits.argmax(-1)
    confusion = torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes)
    return {
        "loss_sum": float(nn.functional.cross_entropy(logits, y, reduction="sum")) if len(x) else 0.0,
        "count": float(len(y)),
        "correct": float((pred == y).sum()),
        "confusion": confusion.double().tolist(),
    }


def epoch_steps(epochs: float, train_size: int, batch_size: int, max_steps: int) -> int:
    """Local steps of a device that trains `epochs` passes over its `train_size` examples in
    batches of `batch_size` (a batch holds at most the device's examples): at least 1, at most
    `max_steps` (its class's local steps: the public bound on a device's work and on its weight
    in the aggregate).

    FedAvg's local epochs (McMahan et al., "Communication-Efficient Learning of Deep Networks
    from Decentralized Data", AISTATS 2017: u_k = E n_k / B updates on client k): a device with
    more data takes more steps and, weighted by the examples it saw, counts for more, so the
    round's average estimates the pooled objective, every example alike. With a fixed number of
    steps every device counts alike, whatever data it holds."""
    if not epochs > 0 or train_size < 1 or batch_size < 1 or max_steps < 1:
        raise ValueError(
            f"need epochs > 0 and train size, batch and max steps >= 1, got {epochs}, {train_size}, "
            f"{batch_size}, {max_steps}"
        )
    per_step = min(batch_size, train_size)
    # rounded first, so that float error cannot turn a whole number of steps into one more
    return max(1, min(max_steps, math.ceil(round(epochs * train_size / per_step, 9))))


def round_seed(seed: int, client_id: str, server_round: int) -> int:
    """The batch-order seed of one device in one round."""
    return stable_seed("batches", seed, client_id, server_round)
