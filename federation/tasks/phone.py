"""The phone task: next-word prediction on a keyboard (as in Gboard, Hard et al. 2018).

Data: Shakespeare, one client per (play, speaking role) as in LEAF (`federation.data.phone`);
held-out: whole speeches the client never trains on. Model: MiniLM with a causal mask, LoRA, and
a head tied to the frozen word embeddings (`federation.model.edge.PhoneModel`). Metrics: top-1
and top-3 next-token accuracy; baselines: unigram and bigram counts fit on the fleet's training
text, which a good run must beat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from federation.model.backbones import TEXT_HIDDEN
from federation.model.edge import TaskModel, seeded_init
from federation.model.lora import LoraSettings, wrap_with_lora
from federation.tasks.base import Sums, Task, TaskInfo
from federation.training import EVAL_BATCH, TrainResult, TrainSettings, train_steps

if TYPE_CHECKING:
    from federation.config import RunConfig


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
        seeded_init(self.head, seed, "phone-head")

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


def phone_loss(model: PhoneModel, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over real targets; also logits and the target mask."""
    logits = model(seqs)[:, :-1]
    targets = seqs[:, 1:]
    valid = targets != 0
    loss = nn.functional.cross_entropy(logits[valid], targets[valid])
    return loss, logits, valid


def train_phone(model: PhoneModel, train: torch.Tensor, settings: TrainSettings, seed: int) -> TrainResult:
    return train_steps(model, len(train), lambda idx: phone_loss(model, train[idx])[0], settings, seed)


@torch.no_grad()
def eval_phone(model: PhoneModel, test: torch.Tensor) -> dict[str, float]:
    model.eval()
    sums = {"loss_sum": 0.0, "count": 0.0, "top1": 0.0, "top3": 0.0}
    for batch in test.split(EVAL_BATCH):
        logits = model(batch)[:, :-1]
        targets = batch[:, 1:]
        valid = targets != 0
        logits, targets = logits[valid], targets[valid]
        sums["loss_sum"] += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top3 = logits.topk(3, dim=-1).indices
        sums["top1"] += float((top3[:, 0] == targets).sum())
        sums["top3"] += float((top3 == targets[:, None]).any(-1).sum())
        sums["count"] += float(targets.numel())
    return sums


class PhoneTask(Task):
    info = TaskInfo(
        name="phone",
        description="next-token prediction on Shakespeare, one device per (play, role)",
        metrics=("top1", "top3"),
        primary_metric="top1",
        # MiniLM at 32 tokens, forward + backward through the frozen backbone (devices.toml)
        flops_per_example=1.38e9,
        eval_cap=1024,  # sequences: per-round server evaluation stays affordable on 2 cores
    )

    def clients(self, cache: Path | None) -> Sequence[str]:
        from federation.data.phone import phone_clients

        return phone_clients(cache=cache)

    def load_client(self, client_id: str, seed: int, *, seq_len: int, cache: Path | None) -> Any:
        from federation.data.phone import load_phone_client

        return load_phone_client(client_id, seed, seq_len=seq_len, cache=cache)

    def build_model(self, lora: LoraSettings, seed: int, rank: int, run: RunConfig | None) -> TaskModel:
        return PhoneModel(lora, seed, rank)

    def train(
        self,
        model: TaskModel,
        data: Any,
        settings: TrainSettings,
        seed: int,
        *,
        client_id: str,
        run: RunConfig,
        private: np.ndarray | None,
    ) -> tuple[TrainResult, np.ndarray | None]:
        return train_phone(model, data.train, settings, seed), None  # type: ignore[arg-type]

    def train_size(self, data: Any) -> int:
        return len(data.train)  # the device's training sequences

    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
        return eval_phone(model, data.test)  # type: ignore[arg-type,return-value]

    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        return (torch.cat([d.test for d in data]),)

    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        return eval_phone(model, held[0])  # type: ignore[arg-type,return-value]

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        count = float(sums["count"])
        return {"top1": float(sums["top1"]) / count, "top3": float(sums["top3"]) / count}

    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        from federation.data.baselines import phone_baselines
        from federation.data.phone import PhoneClientData

        union = PhoneClientData("fleet", torch.cat([d.train for d in data]), held[0])
        return phone_baselines([union])


TASK = PhoneTask()
