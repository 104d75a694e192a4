"""From summed evaluation results to metrics: top-k accuracy, AUC, macro-F1.

Sums add up across devices, so the server's metric over the union of held-out splits is exact
(AUC up to its histogram binning: ties within a bin count one half).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from federation.errors import FedgeError
from federation.tasks import BUILTIN, get_task


class _PrimaryMetrics(Mapping[str, str]):
    """task name -> its primary metric (`TaskInfo.primary_metric`): a view of the task registry,
    not a second table. Any task the registry resolves can be looked up; iterating gives fedge's
    own tasks (a process's plug-ins are not listed, so the view does not depend on what ran)."""

    def _table(self) -> dict[str, str]:
        return {name: get_task(name).info.primary_metric for name in BUILTIN}

    def __getitem__(self, task: str) -> str:
        try:
            return get_task(task).info.primary_metric
        except FedgeError:
            raise KeyError(task) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


PRIMARY_METRIC: Mapping[str, str] = _PrimaryMetrics()


def add_sums(total: dict[str, float | list[float]], part: Mapping[str, float | Sequence[float]]) -> None:
    """total += part, elementwise for lists."""
    for key, value in part.items():
        if isinstance(value, (list, tuple, np.ndarray)):
            prev = total.get(key)
            arr = np.asarray(value, dtype=np.float64)
            total[key] = (arr + np.asarray(prev)).tolist() if prev is not None else arr.tolist()
        else:
            total[key] = float(total.get(key, 0.0)) + float(value)  # type: ignore[arg-type]


def auc_from_histograms(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties (same bin) counting 1/2."""
    pos_a, neg_a = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos_a.sum(), neg_a.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg_a)[:-1]])
    return float((pos_a * (neg_below + 0.5 * neg_a)).sum() / (n_pos * n_neg))


def macro_f1_from_confusion(confusion: Sequence[float], n_classes: int) -> float:
    """Mean F1 over the classes present in truth or prediction (rows: truth, cols: predicted)."""
    c = np.asarray(confusion, dtype=np.float64).reshape(n_classes, n_classes)
    tp = np.diag(c)
    support, predicted = c.sum(1), c.sum(0)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean()) if present.any() else float("nan")


def finalize(task: str, sums: Mapping[str, float | Sequence[float]]) -> dict[str, float]:
    """Metrics of one task from its summed evaluation results: mean loss, examples, and the
    task's own metrics (`Task.metrics`)."""
    count = float(sums.get("count", 0.0))  # type: ignore[arg-type]
    if count <= 0:
        return {}
    out = {"loss": float(sums["loss_sum"]) / count, "examples": count}  # type: ignore[arg-type]
    out.update(get_task(task).metrics(sums))
    return out
