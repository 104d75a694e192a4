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

from federation.tasks.base import Sums, Task, TaskInfo

if TYPE_CHECKING:
    import numpy as np
    import torch

    from federation.config import RunConfig
    from federation.model.edge import TaskModel
    from federation.model.lora import LoraSettings
    from federation.training import TrainResult, TrainSettings


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
        from federation.model.edge import PhoneModel

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
        from federation.training import train_phone

        return train_phone(model, data.train, settings, seed), None  # type: ignore[arg-type]

    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
        from federation.training import eval_phone

        return eval_phone(model, data.test)  # type: ignore[arg-type,return-value]

    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        import torch

        return (torch.cat([d.test for d in data]),)

    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        from federation.training import eval_phone

        return eval_phone(model, held[0])  # type: ignore[arg-type,return-value]

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        count = float(sums["count"])
        return {"top1": float(sums["top1"]) / count, "top3": float(sums["top3"]) / count}

    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        import torch

        from federation.data.baselines import phone_baselines
        from federation.data.phone import PhoneClientData

        union = PhoneClientData("fleet", torch.cat([d.train for d in data]), held[0])
        return phone_baselines([union])


TASK = PhoneTask()
