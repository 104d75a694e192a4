"""References for a federated run, scored on the same held-out data as the run itself.

- **pretrained**: the model at round 0 (B = 0, seeded heads), before any training.
- **centralized** (the upper bound): the same LoRA model trained on the *pooled* training splits
  of the fleet's devices of a task, for the same total training examples the federated run plans
  (`planned_examples`), at the run's learning rates and r_max; no federation, no privacy. A
  personalised task keeps each client's private part while pooling (`Task.train_pooled`: the
  TV trains one private part per viewer, centralized collaborative filtering), so that the
  reference is the federated model trained centrally, not a different model.
- **local-only**: every device of the fleet trains its own model alone (at its tier's rank and
  batch) on its own training split, for an even share of those examples
  (`local_steps_per_device`); each is scored on its own held-out split and the sums are added,
  as the federated on-device evaluation adds them (Hard et al., "Federated Learning for Mobile
  Keyboard Prediction", 2018, and most cross-device papers report these two anchors).

Scoring uses the run's own code paths: the server-side held-out set (`federation.evaluation`,
the union of the fleet's held-out splits, capped by seed) for the `eval` entry, and each
device's held-out split (`federation.local.local_evaluate`) for the `federated` entry. A
reference is written in a run's format (`reference_entries`: metrics.jsonl lines, round 0 and
round N), so reports read runs and references alike. No Flower here.

The number of training examples is *nominal* by default: what the scenario plans (rounds x
devices per round x the examples a device sees in a round: local steps x batch, or for a class
trained by local epochs the mean over its devices of each one's steps x batch, which its data
sets); a federated run whose devices drop out, straggle or
are not eligible trains fewer (the smart-home night lets 3-8 of the 8 planned watches train a
round). Given the device-rounds a run actually aggregated per task (`trained_device_rounds`, from
its metrics.jsonl; `fedge reference --examples-of RUN_DIR`), the plan is scaled to them
(`task_examples(..., device_rounds=n)`): the same total training examples as that run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.checkpoint import completed_rounds
from federation.config import RunConfig
from federation.data.common import stable_seed
from federation.errors import FedgeError
from federation.fleet import Device, device_for_partition, load_device_data
from federation.metrics import add_sums, finalize
from federation.tasks import get_task

KINDS = ("pretrained", "centralized", "local-only")


# -- pure planning ---------------------------------------------------------------------------


def planned_examples(rounds: int, per_round: Mapping[str, int], per_device: Mapping[str, float]) -> int:
    """Training examples a federated run plans for the classes given: rounds x sum over classes
    of (devices per round x the mean examples a device of the class sees in a round)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    total = sum(per_round[c] * per_device[c] for c in per_round)
    return round(rounds * total)


def trained_device_rounds(entries: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Device-rounds each task's aggregate took in a run: its round entries' `participants`
    summed (round 0, the evaluation of the start, has none)."""
    out: dict[str, int] = {}
    for entry in entries:
        for task, n in (entry.get("participants") or {}).items():
            out[task] = out.get(task, 0) + int(n)
    return out


def read_trained_device_rounds(run_dir: Path, rounds: int) -> dict[str, int]:
    """`trained_device_rounds` of the run in `run_dir` (its metrics.jsonl), which must have
    finished `rounds` rounds: a reference for N rounds matches a run of N rounds."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FedgeError(f"--examples-of {run_dir}: no metrics.jsonl there (a run's output folder has one)")
    # every round it holds, each once (a resumed run's later line for a round replaces the earlier)
    entries = completed_rounds(path, sys.maxsize, why=f"--examples-of {run_dir} is not a run's JSON lines")
    trained_entries = [e for e in entries if int(e["round"]) > 0]
    try:
        trained = trained_device_rounds(trained_entries)
    except (TypeError, ValueError, AttributeError) as exc:
        raise FedgeError(
            f"--examples-of {run_dir}: metrics.jsonl is not a run's JSON lines (participants: {exc})"
        ) from None
    done = [int(e["round"]) for e in trained_entries]
    if done != list(range(1, rounds + 1)):
        last = done[-1] if done else 0
        raise FedgeError(
            f"--examples-of {run_dir}: the run holds rounds 1..{last}, the reference is for {rounds} rounds "
            f"(pass --rounds {last}, or finish the run with --resume)"
        )
    return trained


def centralized_steps(examples: int, batch_size: int) -> int:
    """Steps of one centralized model at `batch_size` that see `examples` examples (at least 1)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return max(1, math.ceil(examples / batch_size))


def local_steps_per_device(class_examples: int, devices: int, batch_size: int) -> int:
    """A device's steps when a class's planned examples are split evenly over its `devices`."""
    if devices < 1 or batch_size < 1:
        raise ValueError(f"need >= 1 device and batch, got {devices}, {batch_size}")
    return max(1, round(class_examples / devices / batch_size))


# -- the fleet of a task ---------------------------------------------------------------------


def task_devices(run: RunConfig, task: str) -> list[Device]:
    """The scenario's devices that run `task` (class, tier, data client), in partition order."""
    scenario = run.scenario
    if scenario.synthetic:
        raise FedgeError(f"references need a natural-client fleet; scenario {scenario.name!r} is synthetic")
    devices = [device_for_partition(scenario, p, run.seed, run.cache_dir) for p in range(scenario.size)]
    return [d for d in devices if d.task == task]


def _classes(run: RunConfig, task: str) -> list[str]:
    return [c for c in run.scenario.fleet if run.scenario.class_task(c) == task]


def _class_batch(run: RunConfig, devices: Sequence[Device], device_class: str) -> float:
    sizes = [min(run.train.batch_size, d.batch_size) for d in devices if d.device_class == device_class]
    return float(np.mean(sizes)) if sizes else float(run.train.batch_size)


def device_round_examples(run: RunConfig, devices: Sequence[Device], device_class: str) -> float:
    """The mean examples a device of the class sees in a round: its local steps x the class's mean
    batch; for a class trained by local epochs, each device's own steps x batch (its data sets
    them, `federation.local.device_settings`), averaged over the class's devices."""
    members = [d for d in devices if d.device_class == device_class]
    if device_class not in run.scenario.local_epochs or not members:
        return run.train_for(device_class).steps * _class_batch(run, devices, device_class)
    from federation.local import device_settings

    seen = []
    for device in members:
        data = load_device_data(device, run.seed, run.seq_len, run.cache_dir)
        settings = device_settings(run, device, data)
        seen.append(settings.steps * min(settings.batch_size, get_task(device.task).train_size(data)))
    return float(np.mean(seen))


def task_examples(
    run: RunConfig, task: str, devices: Sequence[Device], device_rounds: int | None = None
) -> dict[str, int]:
    """Planned training examples of the federated run per device class of `task`; given the
    device-rounds a run of it aggregated, the plan scaled by their share of the planned
    device-rounds (every class of the task alike)."""
    classes = _classes(run, task)
    per_round = {c: min(run.scenario.per_round.get(c, 0), run.scenario.fleet[c]) for c in classes}
    out = {
        c: planned_examples(run.rounds, {c: per_round[c]}, {c: device_round_examples(run, devices, c)})
        for c in classes
    }
    if device_rounds is None:
        return out
    planned = run.rounds * sum(per_round.values())
    if device_rounds == 0:
        # a model trained on no examples is the start; centralized_steps' floor of one step would
        # pass a one-step model off as the reference of a run that never trained the task
        raise FedgeError(
            f"task {task!r}: the run aggregated it in no round (0 trained device-rounds): "
            "there is nothing to train a reference on (its pretrained reference is the run's start; "
            "name the other tasks with --task)"
        )
    if device_rounds < 0 or device_rounds > planned:
        raise FedgeError(
            f"task {task!r}: {device_rounds} trained device-rounds, the plan has {planned} "
            f"({run.rounds} rounds x {sum(per_round.values())} a round): not a run of this scenario"
        )
    return {c: round(n * device_rounds / planned) if planned else 0 for c, n in out.items()}


# -- scoring ---------------------------------------------------------------------------------


def score(
    run: RunConfig,
    task: str,
    devices: Sequence[Device],
    shared_of: Callable[[Device], Mapping[str, np.ndarray]],
    private_of: Callable[[Device], np.ndarray | None],
    server: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, float], dict[str, float]]:
    """(server-side metrics of the `server` shared state, or {} when None; on-device metrics,
    each device scored with its own shared state and private part, sums added)."""
    from federation.evaluation import held_out
    from federation.local import local_evaluate, task_model

    evaluated: dict[str, float] = {}
    if server is not None and get_task(task).info.server_eval:
        model = task_model(run, task)
        model.load_shared_state(server)
        held = held_out(run.scenario, task, run.seed, run.seq_len, run.cache_dir)
        evaluated = finalize(task, get_task(task).evaluate_held_out(model, held.test, run))
    sums: dict[str, Any] = {}
    for device in devices:
        data = load_device_data(device, run.seed, run.seq_len, run.cache_dir)
        add_sums(sums, local_evaluate(run, device, data, shared_of(device), private_of(device)))
    return evaluated, finalize(task, sums)


def initial_shared(run: RunConfig, task: str) -> dict[str, np.ndarray]:
    from federation.model.edge import initial_state, task_slice

    return task_slice(initial_state((task,), run.lora, run.seed, run), task)


# -- the references --------------------------------------------------------------------------


@dataclass
class TaskReference:
    """One task's reference: its metrics (server-side `eval`, on-device `federated`) and what
    it cost."""

    task: str
    kind: str
    eval: dict[str, float]
    federated: dict[str, float]
    examples: int  # training examples the reference trained on (0: pretrained)
    steps: dict[str, int]  # steps per trained model (centralized: {"pooled": n}; local-only: per device)
    seconds: float


def pretrained(run: RunConfig, task: str, device_rounds: int | None = None) -> TaskReference:
    """The start: round 0's model on the server's held-out set and on every device's own."""
    start = time.perf_counter()
    devices = task_devices(run, task)
    shared = initial_shared(run, task)
    ev, fed = score(run, task, devices, lambda _d: shared, lambda _d: None, shared)
    return TaskReference(task, "pretrained", ev, fed, 0, {}, time.perf_counter() - start)


def centralized(run: RunConfig, task: str, device_rounds: int | None = None) -> TaskReference:
    """One r_max model trained on the pooled training splits of the task's fleet
    (`Task.train_pooled`), for the federated run's planned examples (or those of
    `device_rounds`, `task_examples`) at the run's batch size and the task's class's local
    optimizer and learning rates."""
    from federation.model.edge import build_task_model

    start = time.perf_counter()
    devices = task_devices(run, task)
    examples = sum(task_examples(run, task, devices, device_rounds).values())
    steps = centralized_steps(examples, run.train.batch_size)
    data = [load_device_data(d, run.seed, run.seq_len, run.cache_dir) for d in devices]
    model = build_task_model(task, run.lora, run.seed, run=run)
    model.load_shared_state(initial_shared(run, task))
    seed = stable_seed("centralized", run.seed, task)
    torch.manual_seed(seed)
    # the learning rates of the task's (first) device class: a scenario may set a class's head lr
    classes = _classes(run, task)
    settings = dataclasses.replace(run.train_for(classes[0]) if classes else run.train, steps=steps)
    get_task(task).train_pooled(model, data, settings, seed, run=run)
    shared = model.shared_state()
    ev, fed = score(run, task, devices, lambda _d: shared, lambda _d: None, shared)
    return TaskReference(
        task, "centralized", ev, fed, steps * run.train.batch_size, {"pooled": steps},
        time.perf_counter() - start,
    )  # fmt: skip


def local_only(run: RunConfig, task: str, device_rounds: int | None = None) -> TaskReference:
    """Every device alone: its own model from the pretrained start, an even share of its
    class's planned examples (or those of `device_rounds`), scored on its own held-out split
    (sums added over devices)."""
    from federation.local import local_train

    start = time.perf_counter()
    devices = task_devices(run, task)
    per_class = task_examples(run, task, devices, device_rounds)
    initial = initial_shared(run, task)
    shared: dict[str, dict[str, np.ndarray]] = {}
    private: dict[str, np.ndarray | None] = {}
    steps: dict[str, int] = {}
    examples = 0
    for device in devices:
        n_class = sum(1 for d in devices if d.device_class == device.device_class)
        batch = min(run.train.batch_size, device.batch_size)
        n = local_steps_per_device(per_class[device.device_class], n_class, batch)
        alone = dataclasses.replace(run, local_steps=n)
        data = load_device_data(device, run.seed, run.seq_len, run.cache_dir)
        result = local_train(alone, device, data, initial, 0, None)
        shared[device.data_client] = {k: initial[k] + result.delta[k] for k in initial}
        private[device.data_client] = result.private
        steps[device.data_client] = n
        examples += int(result.metrics["num-examples"])
    _, fed = score(
        run, task, devices, lambda d: shared[d.data_client], lambda d: private[d.data_client], None
    )
    return TaskReference(task, "local-only", {}, fed, examples, steps, time.perf_counter() - start)


REFERENCES: dict[str, Callable[[RunConfig, str, int | None], TaskReference]] = {
    "pretrained": pretrained,
    "centralized": centralized,
    "local-only": local_only,
}


def reference(
    run: RunConfig,
    kind: str,
    tasks: Sequence[str] | None = None,
    device_rounds: Mapping[str, int] | None = None,
) -> list[TaskReference]:
    """The `kind` reference of each task of the run's scenario (or of `tasks`); with
    `device_rounds` (per task, `trained_device_rounds` of a run), for that run's examples."""
    if kind not in REFERENCES:
        raise FedgeError(f"unknown reference kind {kind!r}: use one of {', '.join(KINDS)}")
    names = list(tasks or run.scenario.tasks)
    unknown = [t for t in names if t not in run.scenario.tasks]
    if unknown:
        raise FedgeError(
            f"task {unknown[0]!r} is not run by scenario {run.scenario.name!r} "
            f"(its tasks: {', '.join(run.scenario.tasks)})"
        )
    return [
        REFERENCES[kind](run, t, None if device_rounds is None else device_rounds.get(t, 0)) for t in names
    ]


def reference_entries(
    start: Sequence[TaskReference], end: Sequence[TaskReference], rounds: int
) -> list[dict[str, Any]]:
    """metrics.jsonl lines in a run's format: round 0 (the pretrained start) and round
    `rounds` (the reference after training), each with `eval` and `federated` per task."""

    def line(refs: Sequence[TaskReference], r: int) -> dict[str, Any]:
        return {
            "round": r,
            "eval": {x.task: x.eval for x in refs if x.eval},
            "federated": {x.task: x.federated for x in refs if x.federated},
            "wall_seconds": sum(x.seconds for x in refs),
            "upload_bytes": 0,
            "download_bytes": 0,
        }

    return [line(start, 0), line(end, rounds)]
