"""Server-side held-out evaluation on the union of the fleet's held-out splits.

The held-out splits are the same ones each device keeps; no device trains on them. What a task
evaluates there (the whole model, or the shared part alone when devices keep a private part) is
the task's to say (`Task.evaluate_held_out`). A held-out set larger than the task's cap (the
scenario's, else `TaskInfo.eval_cap`) is a seeded draw of its rows, to keep per-round evaluation
affordable on 2 cores; the cap and the set size go in the metrics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from federation.data.common import stable_seed
from federation.fleet import Device, all_data_clients, fleet_data_clients, load_device_data
from federation.scenarios import Scenario, get_scenario
from federation.tasks import get_task


@dataclass(frozen=True)
class HeldOut:
    """A task's central held-out set: aligned rows (e.g. phone: (seqs,); tv: (items, labels))."""

    task: str
    test: tuple[torch.Tensor, ...]
    clients: tuple[str, ...]


def fleet_devices(scenario: Scenario, task: str, seed: int, cache: str = "") -> list[Device]:
    """One device per data client whose held-out split the fleet's devices of `task` hold.

    A synthetic fleet shards every natural client, so the union of its devices' held-out splits
    is every natural client's held-out split."""
    devices: dict[str, Device] = {}  # by data client: two classes of one task may share clients
    for device_class, count in scenario.fleet.items():
        if not count or scenario.class_task(device_class) != task:
            continue
        if scenario.synthetic:
            clients = all_data_clients(device_class, cache)
        else:
            clients = fleet_data_clients(device_class, count, seed, cache)
        for client in clients:
            devices.setdefault(client, Device(device_class, client))
    return list(devices.values())


def held_out(scenario: Scenario, task: str, seed: int, seq_len: int = 32, cache: str = "") -> HeldOut:
    """The task's central held-out set for a (named) scenario; built once per process."""
    return _held_out(scenario.ref, task, seed, seq_len, cache)


@functools.lru_cache(maxsize=4)
def _held_out(scenario_ref: str, task: str, seed: int, seq_len: int, cache: str) -> HeldOut:
    scenario = get_scenario(scenario_ref)
    devices = fleet_devices(scenario, task, seed, cache)
    test = get_task(task).held_out([load_device_data(d, seed, seq_len, cache) for d in devices])
    n = len(test[0])
    cap = scenario.eval_cap.get(task, get_task(task).info.eval_cap)
    if cap is not None and n > cap:
        rng = np.random.default_rng(stable_seed("eval-cap", seed, task))
        keep = torch.from_numpy(np.sort(rng.choice(n, size=cap, replace=False)))
        test = tuple(t[keep] for t in test)
    return HeldOut(task, test, tuple(d.data_client for d in devices))
