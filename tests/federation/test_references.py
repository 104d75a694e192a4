"""The centralized reference's training (`Task.train_pooled`): the default pools every client
into one (`federation.data.common.pool`); the TV, a personalised task, keeps each viewer's own
private part while pooling their ratings (`federation.tasks.tv.train_tv_pooled`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from federation.config import RunConfig
from federation.data.common import pool
from federation.errors import FedgeError
from federation.model.edge import build_task_model
from federation.tasks.tv import TVModel, _item_tokens, personalize_tv, train_tv_pooled
from federation.training import TrainSettings


@dataclass(frozen=True)
class _Client:
    client_id: str
    x: torch.Tensor
    y: np.ndarray
    classes: int


def test_pool_concatenates_every_row_field_and_names_the_pooled_client() -> None:
    a = _Client("a", torch.arange(6).reshape(3, 2), np.array([1, 2, 3]), 7)
    b = _Client("b", torch.arange(6, 10).reshape(2, 2), np.array([4, 5]), 7)
    pooled = pool([a, b])
    assert pooled.client_id == "pooled"
    assert torch.equal(pooled.x, torch.arange(10).reshape(5, 2))
    assert pooled.y.tolist() == [1, 2, 3, 4, 5]
    assert pooled.classes == 7  # not a row field: kept as the first client's


def test_pool_refuses_nothing_and_data_that_is_not_a_dataclass() -> None:
    with pytest.raises(ValueError, match="nothing to pool"):
        pool([])
    with pytest.raises(FedgeError, match="must be a dataclass"):
        pool([{"x": torch.zeros(1)}])


@contextmanager
def _no_dropout(model: nn.Module) -> Iterator[None]:
    """MiniLM's dropout off while the test runs, so that a training step's loss is exact."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p


def test_tv_pooled_training_scores_each_rating_with_its_own_viewers_part() -> None:
    run = RunConfig.parse({"scenario": "smart-home"})
    model = build_task_model("tv", run.lora, run.seed, run=run)
    assert isinstance(model, TVModel)
    tokens, mask = _item_tokens(run.cache_dir)
    # two viewers who rated the same 20 titles and disagree on every one
    items = torch.arange(40, 60).repeat(2)
    taste = (torch.arange(20) % 3 == 0).float()
    labels = torch.cat([taste, 1.0 - taste])
    viewer = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    starts = torch.stack([model.new_private("a", 0), model.new_private("b", 0)])
    settings = TrainSettings(steps=1, batch_size=40, private_l2=1.0)
    # each viewer's own fit against the untrained item side: what the first step must score with
    with torch.no_grad():
        emb = model.item_embedding(tokens[items], mask[items])
    own = torch.stack(
        [personalize_tv(model, starts[v], emb[viewer == v], labels[viewer == v], 1.0) for v in (0, 1)]
    )
    with torch.no_grad():
        expected = nn.functional.binary_cross_entropy_with_logits(model.score_rows(emb, own[viewer]), labels)
        one_part = nn.functional.binary_cross_entropy_with_logits(
            model.score_rows(emb, own[viewer * 0]), labels
        )
    assert float(one_part) > float(expected) + 0.05  # the check below can tell the two apart

    with _no_dropout(model):
        result, users = train_tv_pooled(model, starts, viewer, items, labels, tokens, mask, settings, seed=0)
    assert result.num_examples == 40
    assert result.loss == pytest.approx(float(expected), abs=1e-4)
    # the parts come back one per viewer, moved by one joint step from their own fits
    assert users.shape == starts.shape
    assert torch.allclose(users, own, atol=0.05)
    assert not torch.allclose(users[0], users[1], atol=0.05)


def test_the_tv_centralized_reference_trains_one_private_part_per_viewer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import federation.tasks.tv as tv
    from federation.references import centralized, task_devices

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    used: list[TrainSettings] = []
    real = tv.train_tv_pooled

    def spy(model: TVModel, privates: torch.Tensor, viewer: torch.Tensor, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        calls.append((privates, viewer))
        used.append(args[-2])  # type: ignore[arg-type]  # (..., settings, seed)
        return real(model, privates, viewer, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tv, "train_tv_pooled", spy)
    run = RunConfig.parse({"scenario": "smart-home", "num-rounds": 1})
    ref = centralized(run, "tv")
    viewers = task_devices(run, "tv")
    ((privates, viewer),) = calls
    assert len(privates) == len(viewers) == 10
    assert sorted(set(viewer.tolist())) == list(range(10))  # every viewer's ratings, each their own row
    # trained as the TV class trains (the scenario's optimizer and rates), not as the run's default
    ((settings,),) = [used]
    tv_class = run.train_for("tv")
    assert (settings.optimizer, settings.lr, settings.head_lr) == (
        tv_class.optimizer,
        tv_class.lr,
        tv_class.head_lr,
    )
    assert (settings.optimizer, settings.lr, settings.head_lr) != (
        run.train.optimizer,
        run.train.lr,
        run.train.head_lr,
    )
    assert ref.steps["pooled"] >= 1 and ref.eval["auc"] > 0.5 and "viewer_auc" in ref.federated


# -- the examples a run actually trained (`fedge reference --examples-of RUN_DIR`) -----------


def test_trained_device_rounds_add_each_rounds_participants() -> None:
    from federation.references import trained_device_rounds

    entries = [
        {"round": 0, "eval": {}},  # the start: nobody trained
        {"round": 1, "participants": {"phone": 4, "sensor": 7}},
        {"round": 2, "participants": {"phone": 4}},  # the watches sat out
        {"round": 3, "participants": {"phone": 3, "sensor": 3}},
    ]
    assert trained_device_rounds(entries) == {"phone": 11, "sensor": 10}


def test_a_reference_for_a_runs_device_rounds_scales_the_plan_to_them() -> None:
    from federation.references import task_devices, task_examples

    run = RunConfig.parse({"scenario": "smart-home"})
    devices = task_devices(run, "sensor")
    (planned,) = task_examples(run, "sensor", devices).values()
    # 12 rounds x 8 watches x 60 steps x the watches' mean batch (16 on high, 8 on low: 12)
    assert planned == 12 * 8 * 60 * 12
    (trained,) = task_examples(run, "sensor", devices, device_rounds=45).values()
    assert trained == round(planned * 45 / 96) == 32_400
    with pytest.raises(FedgeError, match="97 trained device-rounds, the plan has 96"):
        task_examples(run, "sensor", devices, device_rounds=97)
    # a task the run never aggregated: no one-step stand-in for a reference
    with pytest.raises(FedgeError, match="aggregated it in no round"):
        task_examples(run, "sensor", devices, device_rounds=0)


def test_the_centralized_reference_trains_on_the_runs_examples_when_given() -> None:
    from federation.references import centralized, centralized_steps

    run = RunConfig.parse({"scenario": "smart-home", "num-rounds": 1})
    planned = centralized(run, "sensor")
    trained = centralized(run, "sensor", device_rounds=3)  # 3 of the round's 8 planned watches
    assert planned.steps == {"pooled": centralized_steps(1 * 8 * 60 * 12, 16)} == {"pooled": 360}
    assert trained.steps == {"pooled": centralized_steps(3 * 60 * 12, 16)} == {"pooled": 135}
    assert trained.examples == 135 * 16 and trained.eval["accuracy"] > 0


def test_reading_a_runs_device_rounds_refuses_a_missing_or_unfinished_run(tmp_path: Path) -> None:
    import json

    from federation.references import read_trained_device_rounds

    with pytest.raises(FedgeError, match=r"no metrics\.jsonl there"):
        read_trained_device_rounds(tmp_path, 3)
    lines = [{"round": 0}, {"round": 1, "participants": {"tv": 4}}, {"round": 2, "participants": {"tv": 3}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(
        FedgeError, match=r"holds rounds 1\.\.2, the reference is for 3 rounds \(pass --rounds 2"
    ):
        read_trained_device_rounds(tmp_path, 3)
    assert read_trained_device_rounds(tmp_path, 2) == {"tv": 7}
    # a resumed run's later line for a round replaces the earlier one: counted once
    lines.append({"round": 2, "participants": {"tv": 4}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_trained_device_rounds(tmp_path, 2) == {"tv": 8}
    # a run of more rounds than the reference's is another plan
    with pytest.raises(FedgeError, match=r"holds rounds 1\.\.2, the reference is for 1 rounds"):
        read_trained_device_rounds(tmp_path, 1)
    for bad in ("{not json\n", '{"round": 1, "participants": {"tv": "four"}}\n', '{"participants": {}}\n'):
        (tmp_path / "metrics.jsonl").write_text(bad)
        with pytest.raises(FedgeError, match="not a run's JSON lines"):
            read_trained_device_rounds(tmp_path, 1)
