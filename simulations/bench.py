"""Benchmarks that print figures (run on a quiet machine; quote ratios from one run)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rich.console import Console


def overhead(seed: int, console: Console) -> float:
    """Flower's cost over the work itself, for one round of the `bench` scenario.

    The limit: the round's local training of every device, done directly in this process, one
    device after another (warm: models built, data loaded). Flower: the same devices, data,
    steps and seed in a Flower simulation (2 Ray actors x 1 thread on 2 cores), timed from
    the server's send to the last reply aggregated, on rounds after the first (the first pays
    actor start and imports). Prints both and their ratio on the last line.
    """
    import torch

    from federation.config import RunConfig
    from federation.fleet import device_for_partition, load_device_data
    from federation.local import local_train
    from federation.model.edge import initial_state, task_slice
    from simulations.cli import simulate_scenario

    run = RunConfig.parse({"scenario": "bench", "seed": seed})
    devices = [device_for_partition(run.scenario, p, seed) for p in range(run.scenario.size)]
    state = initial_state(run.scenario.tasks, run.lora, seed, run.tv_user_dim)
    data = [load_device_data(d, seed, run.seq_len) for d in devices]
    torch.set_num_threads(1)  # what one simulated device (one Ray actor) gets
    for task in run.scenario.tasks:  # warm-up: build each task model once
        i = next(i for i, d in enumerate(devices) if d.task == task)
        local_train(run, devices[i], data[i], task_slice(state, task), 0)
    start = time.perf_counter()
    for device, d in zip(devices, data, strict=True):
        local_train(run, device, d, task_slice(state, device.task), 1)
    direct_1 = time.perf_counter() - start
    console.print(f"direct, one process, 1 thread: {len(devices)} devices' local training in {direct_1:.2f}s")
    console.print(f"direct, ideal on 2 cores (half of it): {direct_1 / 2:.2f}s")

    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        out = simulate_scenario("bench", None, seed, Path(tmp), {}, quiet=True)
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["train_wall_seconds"] for r in rounds if r["round"] >= 2]
    flower = sum(steady) / len(steady)
    first = next(r["train_wall_seconds"] for r in rounds if r["round"] == 1)
    console.print(
        f"Flower simulation (2 actors x 1 thread): round 1 {first:.2f}s, later rounds {flower:.2f}s"
    )
    ratio = flower / (direct_1 / 2)
    console.print(f"overhead ratio (Flower round / ideal direct on 2 cores): {ratio:.2f}")
    return ratio
