"""Server-side held-out evaluation on the union of the fleet's held-out splits.

Used for tasks whose model is wholly shared (phone, sensor). The held-out splits are the same
ones each device keeps; no device trains on them. A phone eval set is capped (drawn by seed) to
keep per-round evaluation affordable on 2 cores; the cap and the set size go in the metrics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from federation.data.common import stable_seed
from federation.fleet import Device, all_data_clients, fleet_data_clients, load_device_data
from federation.scenarios import Scenario, get_scenario


@dataclass(frozen=True)
class HeldOut:
    """A task's central held-out set, plus the union of the same devices' training data."""

    task: str
    test: tuple[torch.Tensor, ...]  # phone: (seqs,); tv: (items, labels); sensor: (x, y)
    clients: tuple[str, ...]


def fleet_devices(scenario: Scenario, device_class: str, seed: int, cache: str = "") -> list[Device]:
    """The data clients whose held-out splits the fleet's devices hold, once each.

    A synthetic fleet shards every natural client, so the union of its devices' held-out splits
    is every natural client's held-out split."""
    count = scenario.fleet.get(device_class, 0)
    if scenario.synthetic and count:
        return [Device(device_class, c) for c in all_data_clients(device_class, cache)]
    return (
        [Device(device_class, c) for c in fleet_data_clients(device_class, count, seed, cache)]
        if count
        else []
    )


def held_out(scenario: Scenario, task: str, seed: int, seq_len: int = 32, cache: str = "") -> HeldOut:
    """The task's central held-out set for a (named) scenario; built once per process."""
    return _held_out(scenario.name, task, seed, seq_len, cache)


@functools.lru_cache(maxsize=4)
def _held_out(scenario_name: str, task: str, seed: int, seq_len: int, cache: str) -> HeldOut:
    scenario = get_scenario(scenario_name)
    devices = fleet_devices(scenario, task, seed, cache)
    data = [load_device_data(d, seed, seq_len, cache) for d in devices]
    clients = tuple(d.data_client for d in devices)
    if task == "phone":
        seqs = torch.cat([d.test for d in data])
        cap = scenario.eval_cap.get("phone", len(seqs))
        if len(seqs) > cap:
            rng = np.random.default_rng(stable_seed("eval-cap", seed, task))
            seqs = seqs[np.sort(rng.choice(len(seqs), size=cap, replace=False))]
        return HeldOut(task, (seqs,), clients)
    if task == "tv":  # the shared part alone (cold start): a new viewer has no private part yet
        items = torch.cat([d.test_items for d in data])
        labels = torch.cat([d.test_labels for d in data])
        cap = scenario.eval_cap.get("tv", len(items))
        if len(items) > cap:
            rng = np.random.default_rng(stable_seed("eval-cap", seed, task))
            keep = np.sort(rng.choice(len(items), size=cap, replace=False))
            items, labels = items[keep], labels[keep]
        return HeldOut(task, (items, labels), clients)
    if task == "sensor":
        return HeldOut(
            task, (torch.cat([d.test_x for d in data]), torch.cat([d.test_y for d in data])), clients
        )
    raise ValueError(f"unknown task {task!r}")


def evaluate_central(
    model: torch.nn.Module, held: HeldOut, cache: str = ""
) -> dict[str, float | list[float]]:
    """Summed results of a task model on a central held-out set."""
    from federation.training import eval_phone, eval_sensor, eval_tv_cold_start

    if held.task == "phone":
        return eval_phone(model, held.test[0])  # type: ignore[arg-type]
    if held.task == "tv":
        from federation.data.tv import tv_items

        catalogue = tv_items(cache=Path(cache) if cache else None)
        return eval_tv_cold_start(
            model,  # type: ignore[arg-type]
            held.test[0],
            held.test[1],
            catalogue.input_ids,
            catalogue.attention_mask,
        )
    return eval_sensor(model, held.test[0], held.test[1])  # type: ignore[arg-type]
