"""The TV's per-viewer AUC ("group AUC"): hand-checked values, its summable on-device form, and
the baselines' figures it is compared with."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.data import baselines, tv
from federation.metrics import add_sums, finalize
from federation.tasks.tv import TASK, _binary_sums, _viewer_auc_sums


def test_a_score_that_only_separates_viewers_scores_half() -> None:
    # viewer 0 likes most of what they rate, viewer 1 little: a per-viewer constant ranks every
    # pooled pair across viewers right more often than not, but no viewer's own titles.
    users = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([1, 1, 0, 0, 0, 1])
    scores = np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1])
    assert baselines.auc(scores, labels) > 0.5
    assert baselines.viewer_auc(scores, labels, users) == 0.5


def test_each_viewer_weighs_by_their_held_out_rows_and_one_label_viewers_are_left_out() -> None:
    users = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    labels = np.array([1, 0, 1, 0, 0, 1, 1, 1])  # viewer 2 liked everything: AUC undefined
    scores = np.array([0.2, 0.1, 0.4, 0.3, 0.6, 0.5, 0.0, 0.9])
    # viewer 0: 1.0 (2 rows); viewer 1: pairs (0.4|0.3) (0.4|0.6) (0.5|0.3) (0.5|0.6): 2/4 (4 rows)
    assert baselines.viewer_auc(scores, labels, users) == pytest.approx((1.0 * 2 + 0.5 * 4) / 6)
    assert math.isnan(baselines.viewer_auc(np.ones(2), np.ones(2), np.zeros(2)))
    with pytest.raises(ValueError, match="users"):
        baselines.viewer_auc(scores, labels, users[:-1])


def test_on_device_sums_add_up_to_the_weighted_mean() -> None:
    # two viewers evaluated on their own TVs, summed as the server sums them
    a_logits, a_labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])  # AUC 1
    b_logits, b_labels = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])  # 1/4
    total: dict = {}
    for logits, labels in ((a_logits, a_labels), (b_logits, b_labels)):
        add_sums(total, {**_binary_sums(logits, labels), **_viewer_auc_sums(logits, labels)})
    metrics = finalize("tv", total)
    assert metrics["viewer_auc"] == pytest.approx((1.0 * 3 + 0.25 * 4) / 7)
    assert metrics["auc"] != pytest.approx(metrics["viewer_auc"])  # a different question
    # a viewer with one label only adds nothing to either sum
    one_label = _viewer_auc_sums(torch.tensor([0.3, 0.7]), torch.ones(2))
    assert one_label == {"viewer_auc_sum": 0.0, "viewer_count": 0.0}


def test_the_cold_start_has_no_viewers_and_reports_no_viewer_auc() -> None:
    sums = _binary_sums(torch.tensor([0.1, 0.9, -0.3]), torch.tensor([0.0, 1.0, 1.0]))
    assert "viewer_auc" not in TASK.metrics(sums)
    assert "viewer_auc" in TASK.info.metrics


def test_tv_baselines_report_it(cache_dir: Path) -> None:
    tvs = [tv.load_tv_client(c, 0, cache_dir) for c in tv.tv_clients(cache_dir)[:30]]
    t = baselines.tv_baselines(tvs)
    assert t["majority"]["viewer_auc"] == 0.5 and t["user-mean"]["viewer_auc"] == 0.5  # constant per viewer
    # the bias model's within-viewer ranking is its item biases': above chance, below its pooled AUC
    assert 0.5 < t["user-item-bias"]["viewer_auc"] < t["user-item-bias"]["auc"]
    assert t["item-bias"]["viewer_auc"] > 0.5
