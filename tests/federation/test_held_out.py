"""Held-out data is never trained on: what a device's model computes on in `local_train`.

Each test runs a real smoke-fleet device's local round (no Flower) with a hook on its task
model's backbone that records every input the model sees while training (every forward pass
of the round, personalisation of a TV's private part included), then looks for the device's
held-out examples in those inputs *by content* (tokens, item texts, sensor samples), not by
index sets. Each also checks that what the model saw is the device's own training data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from federation.config import RunConfig
from federation.data.phone import PAD_ID
from federation.data.tv import tv_items
from federation.fleet import Device, device_for_partition, load_device_data
from federation.local import local_train, task_model, training_rank
from federation.model.edge import initial_state, task_slice

RUN_CONFIG = {"scenario": "smoke", "local-steps": 3}
PARTITION = {"phone": 0, "tv": 1, "sensor": 2}  # smoke fleet order: phone, tv, sensor, ...
NGRAM = 16  # no 16 consecutive tokens of one role's held-out speech recur in its training text
CLS_ID, SEP_ID = 101, 102


@pytest.fixture(scope="module")
def run() -> RunConfig:
    return RunConfig.parse(RUN_CONFIG)


@pytest.fixture(scope="module")
def global_state(run: RunConfig) -> dict[str, np.ndarray]:
    return initial_state(run.scenario.tasks, run.lora, run.seed, run)


def _device(run: RunConfig, task: str) -> Device:
    device = device_for_partition(run.scenario, PARTITION[task], run.seed)
    assert device.task == task
    return device


@contextmanager
def _inputs_seen(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every input tensor (token ids, or IMU windows) the backbone computes on meanwhile."""
    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).detach().clone())

    handle = model.backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _train_and_watch(run: RunConfig, task: str, shared: dict[str, np.ndarray]) -> tuple[Any, list]:
    device = _device(run, task)
    data = load_device_data(device, run.seed, run.seq_len, run.cache_dir)
    model = task_model(run, task, training_rank(run, device))  # the instance local_train uses
    with _inputs_seen(model) as seen:
        result = local_train(run, device, data, task_slice(shared, task), server_round=1)
    assert result.metrics["num-examples"] > 0 and seen
    return data, seen


# ---------------------------------------------------------------------------------- detectors


def _speech_ngrams(chunks: torch.Tensor) -> set[tuple[int, ...]]:
    """NGRAM-token windows inside the speeches of a chunked stream ([CLS] s1 [SEP] s2 ...)."""
    stream = chunks.flatten().tolist()
    grams: set[tuple[int, ...]] = set()
    speech: list[int] = []
    for token in [*stream, SEP_ID]:
        if token in (CLS_ID, SEP_ID, PAD_ID):
            grams |= {tuple(speech[i : i + NGRAM]) for i in range(len(speech) - NGRAM + 1)}
            speech = []
        else:
            speech.append(token)
    return grams


def _row_ngrams(rows: list[torch.Tensor]) -> set[tuple[int, ...]]:
    """NGRAM-token windows of each input row (a row never spans two chunks)."""
    grams: set[tuple[int, ...]] = set()
    for batch in rows:
        for row in batch.tolist():
            grams |= _speech_ngrams(torch.tensor([row]))
    return grams


def _sample_rows(windows: torch.Tensor) -> set[bytes]:
    """Every time sample (6 channels, float32) of IMU windows [n, 6, T], as bytes."""
    return {row.tobytes() for row in windows.permute(0, 2, 1).reshape(-1, windows.shape[1]).numpy()}


def _token_rows(batches: list[torch.Tensor]) -> set[bytes]:
    return {row.numpy().tobytes() for batch in batches for row in batch}


# -------------------------------------------------------------------------------------- tests


def test_phone_trains_on_no_held_out_speech(run: RunConfig, global_state: dict[str, np.ndarray]) -> None:
    data, seen = _train_and_watch(run, "phone", global_state)
    held_out = _speech_ngrams(data.test)
    assert held_out, "the device's held-out speeches are too short to look for"
    assert not _row_ngrams(seen) & held_out, "the phone trained on its held-out speeches"
    # what it trained on are its own training chunks ...
    train_rows = _token_rows([data.train])
    assert all(row.numpy().tobytes() in train_rows for batch in seen for row in batch)
    # ... and the detector does see held-out text when it is there
    assert _row_ngrams([data.test]) & held_out


def test_sensor_trains_on_no_held_out_recording(run: RunConfig, global_state: dict[str, np.ndarray]) -> None:
    data, seen = _train_and_watch(run, "sensor", global_state)
    held_out = _sample_rows(data.test_x)
    trained = set().union(*(_sample_rows(batch) for batch in seen))
    assert not trained & held_out, "the watch trained on samples of its held-out recordings"
    assert trained <= _sample_rows(data.train_x)


def test_tv_trains_and_personalises_on_no_held_out_title(
    run: RunConfig, global_state: dict[str, np.ndarray]
) -> None:
    data, seen = _train_and_watch(run, "tv", global_state)
    tokens = tv_items(run.cache_dir or None).input_ids
    train_texts = _token_rows([tokens[data.train_items]])
    # two MovieLens titles share their text with another; such a text proves nothing either way
    held_out = _token_rows([tokens[data.test_items]]) - train_texts
    assert len(held_out) >= 0.9 * len(set(data.test_items.tolist())) > 0
    trained = _token_rows(seen)
    assert not trained & held_out, "the TV trained (or personalised) on titles it holds out"
    assert trained <= train_texts
