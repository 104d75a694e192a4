"""Count-based baselines, scored on exactly the held-out data the federated models are scored on.

A federated model's number means little alone: a reference run (docs/architecture.md, "Data and
model") found a bigram count model at ~0.16 top-1 on phone, a user + item bias model at AUC
~0.78 on TV, against ~0.14 and ~0.63 for the first LoRA runs. Every report therefore prints
these baselines beside the model, computed here from the same `*ClientData` objects (fit on the
union of the clients' train splits, scored on the union of their test splits), so the comparison
is like for like.

Pure functions of numpy/torch data: no files, no randomness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from federation.data.phone import PhoneClientData
    from federation.data.sensor import SensorClientData
    from federation.data.tv import TVClientData

PAD_ID = 0  # same as federation.data.phone.PAD_ID; not imported to keep this module dependency-free
LIKE_THRESHOLD = 4.0  # same as federation.data.tv.LIKE_THRESHOLD
# L2 strengths of the bias model, Koren's published values (KDD 2008, "Factorization meets the
# neighborhood", section 2.1): fixed a priori, so the baseline is not tuned on anyone's test data.
ITEM_BIAS_L2 = 25.0
USER_BIAS_L2 = 10.0
BIAS_SWEEPS = 5

ArrayLike = np.ndarray | torch.Tensor


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; tied scores share their average rank.

    Ties count one half, so constant scores give exactly 0.5. Returns NaN when the labels are all
    one class (AUC is undefined there) rather than raising: a pooled report should still print.
    """
    s = _np(scores).astype(np.float64).ravel()
    y = _np(labels).ravel() > 0.5
    if s.shape != y.shape:
        raise ValueError(f"auc: {s.size} scores but {y.size} labels")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_f1(pred: ArrayLike, target: ArrayLike, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in `target` or `pred`.

    Classes absent from both have no defined F1 and are left out (scikit-learn's behaviour when
    no `labels` are given), so a client's missing exercise neither helps nor hurts. NaN if empty.
    """
    p = _np(pred).astype(np.int64).ravel()
    t = _np(target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"macro_f1: {p.size} predictions but {t.size} targets")
    if t.size == 0:
        return float("nan")
    tp = np.bincount(t[p == t], minlength=n_classes)[:n_classes].astype(np.float64)
    n_pred = np.bincount(p, minlength=n_classes)[:n_classes]
    n_true = np.bincount(t, minlength=n_classes)[:n_classes]
    present = (n_pred + n_true) > 0
    f1 = 2.0 * tp[present] / (n_pred[present] + n_true[present])  # = 2TP / (2TP + FP + FN)
    return float(f1.mean())


def phone_baselines(clients: list[PhoneClientData]) -> dict[str, dict[str, float]]:
    """Next-token top-1/top-3 accuracy of count models, on the positions the model is scored on.

    Those positions are every t whose target t+1 is not padding (padding is only at the right, so
    the input at t is then real too). "majority" always proposes the training set's most frequent
    tokens; "unigram" is the same model (a unigram's ranking *is* the frequency ranking) and is
    kept as its own key because reports name it. "bigram" ranks the tokens seen after the current
    token, filling any of the 3 slots it cannot (unseen context, < 3 distinct followers) from the
    unigram ranking. Ties in counts go to the smaller token id, so results are deterministic.
    """
    x_train, y_train = _phone_pairs([c.train for c in clients])
    x_test, y_test = _phone_pairs([c.test for c in clients])
    if y_train.size == 0:
        raise ValueError("phone_baselines: the clients have no training tokens")
    vocab = int(max(x_train.max(), y_train.max(), x_test.max(initial=0), y_test.max(initial=0))) + 1
    unigram = _top_k(y_train, 3)
    table = _bigram_table(x_train, y_train, vocab, unigram)
    uni = _topk_scores(np.broadcast_to(unigram, (y_test.size, 3)), y_test)
    return {
        "majority": dict(uni),
        "unigram": dict(uni),
        "bigram": _topk_scores(table[x_test], y_test),
    }


def tv_baselines(clients: list[TVClientData]) -> dict[str, dict[str, float]]:
    """Accuracy and AUC of like/dislike (rating >= 4) predictions on the pooled test ratings.

    - majority: the more frequent train label for everyone (AUC 0.5 by construction).
    - user-mean: score = the viewer's mean train rating (the global mean for a viewer with no
      train ratings); liked iff score >= the threshold that maximises train accuracy.
    - item-bias: rating ~ mu + b_i (item popularity, ridge-shrunk): the cold-start baseline
      for the shared part alone, which knows no viewer.
    - user-item-bias: rating ~ mu + b_u + b_i, fit on the pooled train ratings by a few
      alternating closed-form ridge sweeps (item, then user; Koren's L2 strengths); items never
      rated in train get b_i = 0; the like threshold is again the train-accuracy maximiser.
    The per-viewer parts (user means, b_u) are exactly what docs/architecture.md says a TV must keep
    on-device: these baselines are what a private per-viewer model has to beat.
    Each also reports `viewer_auc`, the held-out-count-weighted mean of each viewer's own AUC (the
    TV model's on-device metric of that name): a per-viewer constant (majority, user-mean) scores
    0.5 there, and user-item-bias ranks a viewer's titles by its item biases alone.
    """
    users_tr, items_tr, r_tr = _tv_rows(clients, test=False)
    users_te, items_te, r_te = _tv_rows(clients, test=True)
    if r_tr.size == 0:
        raise ValueError("tv_baselines: the clients have no training ratings")
    y_tr = r_tr >= LIKE_THRESHOLD
    y_te = r_te >= LIKE_THRESHOLD
    n_users = len(clients)
    n_items = int(max(items_tr.max(), items_te.max(initial=0))) + 1
    mu = float(r_tr.mean())

    majority = bool(y_tr.mean() >= 0.5)
    out = {"majority": {"accuracy": _mean(y_te == majority), "auc": auc(np.zeros(y_te.size), y_te)}}
    out["majority"]["viewer_auc"] = viewer_auc(np.zeros(y_te.size), y_te, users_te)

    counts_u = np.bincount(users_tr, minlength=n_users)
    sums_u = np.bincount(users_tr, weights=r_tr, minlength=n_users)
    user_mean = np.where(counts_u > 0, sums_u / np.maximum(counts_u, 1), mu)
    out["user-mean"] = _scored(user_mean[users_tr], y_tr, user_mean[users_te], y_te, users_te)

    counts_i = np.bincount(items_tr, minlength=n_items)
    # The cold-start baseline for the shared part alone (no viewer information): item popularity.
    item_only = np.bincount(items_tr, weights=r_tr - mu, minlength=n_items) / (counts_i + ITEM_BIAS_L2)
    out["item-bias"] = _scored(mu + item_only[items_tr], y_tr, mu + item_only[items_te], y_te, users_te)

    b_u = np.zeros(n_users)
    b_i = np.zeros(n_items)
    for _ in range(BIAS_SWEEPS):
        b_i = np.bincount(items_tr, weights=r_tr - mu - b_u[users_tr], minlength=n_items) / (
            counts_i + ITEM_BIAS_L2
        )
        b_u = np.bincount(users_tr, weights=r_tr - mu - b_i[items_tr], minlength=n_users) / (
            counts_u + USER_BIAS_L2
        )
    out["user-item-bias"] = _scored(
        mu + b_u[users_tr] + b_i[items_tr], y_tr, mu + b_u[users_te] + b_i[items_te], y_te, users_te
    )
    return out


def sensor_baselines(clients: list[SensorClientData]) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 of always predicting the pooled train majority exercise.

    Macro-F1 is what exposes it: accuracy of a constant guess looks respectable on skewed data,
    its macro-F1 does not.
    """
    train_y = np.concatenate([_np(c.train_y).ravel() for c in clients]).astype(np.int64)
    test_y = np.concatenate([_np(c.test_y).ravel() for c in clients]).astype(np.int64)
    if train_y.size == 0:
        raise ValueError("sensor_baselines: the clients have no training windows")
    n_classes = int(max(train_y.max(), test_y.max(initial=0))) + 1
    majority = int(np.bincount(train_y).argmax())
    pred = np.full(test_y.size, majority)
    return {"majority": {"accuracy": _mean(pred == test_y), "macro_f1": macro_f1(pred, test_y, n_classes)}}


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def _phone_pairs(chunks: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(current token, next token) at every scored position of the given [n, L] chunk tensors."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for c in chunks:
        if c.numel() == 0:
            continue
        a = _np(c).astype(np.int64)
        x, y = a[:, :-1].ravel(), a[:, 1:].ravel()
        keep = y != PAD_ID
        xs.append(x[keep])
        ys.append(y[keep])
    if not xs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def _top_k(tokens: np.ndarray, k: int) -> np.ndarray:
    """The k most frequent tokens, ties to the smaller id, padded with -1 if fewer exist."""
    values, counts = np.unique(tokens, return_counts=True)
    best = values[np.lexsort((values, -counts))][:k]
    return np.concatenate([best, np.full(k - best.size, -1, dtype=np.int64)])


def _bigram_table(x: np.ndarray, y: np.ndarray, vocab: int, unigram: np.ndarray) -> np.ndarray:
    """[vocab, 3] top-3 next tokens per current token, unigram back-off for unfilled slots."""
    keys, counts = np.unique(x * vocab + y, return_counts=True)
    ctx, nxt = keys // vocab, keys % vocab
    order = np.lexsort((nxt, -counts, ctx))
    ctx, nxt = ctx[order], nxt[order]
    first = np.searchsorted(ctx, ctx, side="left")
    rank = np.arange(ctx.size) - first
    table = np.full((vocab, 3), -1, dtype=np.int64)
    top = rank < 3
    table[ctx[top], rank[top]] = nxt[top]
    # Unseen contexts back off to the unigram ranking; partly filled rows take its first tokens
    # that are not already in the row.
    unseen = (table < 0).all(axis=1)
    table[unseen] = unigram
    for row in np.flatnonzero((table < 0).any(axis=1) & ~unseen):
        have = [t for t in table[row] if t >= 0]
        fill = [t for t in unigram if t >= 0 and t not in have]
        table[row] = (have + fill + [-1, -1, -1])[:3]
    return table


def _topk_scores(preds: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """top1/top3 accuracy of [n, 3] ranked predictions."""
    if target.size == 0:
        return {"top1": float("nan"), "top3": float("nan")}
    return {
        "top1": float((preds[:, 0] == target).mean()),
        "top3": float((preds == target[:, None]).any(axis=1).mean()),
    }


def _tv_rows(clients: list[TVClientData], test: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled (user position, item index, rating) arrays of the clients' train or test split."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    ratings: list[np.ndarray] = []
    for u, c in enumerate(clients):
        it = _np(c.test_items if test else c.train_items).astype(np.int64).ravel()
        users.append(np.full(it.size, u, dtype=np.int64))
        items.append(it)
        ratings.append(_np(c.test_ratings if test else c.train_ratings).astype(np.float64).ravel())
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(users), np.concatenate(items), np.concatenate(ratings)


def _best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cut c maximising the accuracy of "liked iff score >= c" (smallest c among ties)."""
    candidates = np.append(np.unique(scores), np.inf)
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    # positives at or above c are right, negatives below c are right
    right = (pos.size - np.searchsorted(pos, candidates, side="left")) + np.searchsorted(
        neg, candidates, side="left"
    )
    return float(candidates[int(np.argmax(right))])


def _scored(
    train_scores: np.ndarray,
    train_y: np.ndarray,
    test_scores: np.ndarray,
    test_y: np.ndarray,
    test_users: np.ndarray,
) -> dict[str, float]:
    threshold = _best_threshold(train_scores, train_y)
    return {
        "accuracy": _mean((test_scores >= threshold) == test_y),
        "auc": auc(test_scores, test_y),
        "viewer_auc": viewer_auc(test_scores, test_y, test_users),
    }


def viewer_auc(scores: ArrayLike, labels: ArrayLike, users: ArrayLike) -> float:
    """Each user's own AUC, averaged over users weighted by their number of rows ("group AUC",
    Zhou et al., KDD 2018), over the users whose rows hold both labels; NaN if none do. It asks
    only whether a user's positives rank above that user's negatives: a score that is constant
    per user gives exactly 0.5, however well it separates users."""
    s = _np(scores).astype(np.float64).ravel()
    y = _np(labels).ravel() > 0.5
    u = _np(users).ravel()
    if not s.shape == y.shape == u.shape:
        raise ValueError(f"viewer_auc: {s.size} scores, {y.size} labels, {u.size} users")
    total = weight = 0.0
    for user in np.unique(u):
        rows = u == user
        within = auc(s[rows], y[rows])
        if within == within:  # not NaN: both labels present
            total += within * rows.sum()
            weight += rows.sum()
    return total / weight if weight else float("nan")
