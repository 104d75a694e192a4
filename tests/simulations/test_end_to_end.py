"""One small end-to-end run through Flower's simulation engine (`flwr run`, Ray on loopback).

It checks what a user of `fedge simulate --scenario smoke` relies on: the run finishes, every
output is there, held-out loss falls for the wholly shared tasks, the final metric beats the
pretrained start, and nothing the run started is left running.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from simulations.cli import simulate_scenario

FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server")


def _flower_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(name in cmd for name in FLOWER_PROCESSES):
            pids.add(proc.pid)
    return pids


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = _flower_pids()
    out = simulate_scenario("smoke", None, 0, tmp_path_factory.mktemp("smoke"), {}, quiet=True)
    leftover = _flower_pids() - before
    assert not leftover, f"processes left running after the run: {leftover}"
    return out


def test_outputs_exist(smoke_run: Path) -> None:
    for name in ("metrics.jsonl", "summary.json", "checkpoint.safetensors", "checkpoint.json", "flwr.log"):
        assert (smoke_run / name).is_file(), name
    for task in ("phone", "tv", "sensor"):
        assert (smoke_run / "adapter" / task / "adapter_config.json").is_file()
        assert (smoke_run / "plots" / f"{task}.png").is_file()


def test_held_out_loss_falls_and_metrics_improve(smoke_run: Path) -> None:
    rounds = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # Phone is the task with enough held-out data in a 2-round smoke run for its loss to be a
    # stable signal (the two smoke watches hold a few recordings each; their loss is noisy).
    losses = [r["eval"]["phone"]["loss"] for r in rounds]
    assert losses[2] < losses[1] < losses[0], losses
    summary = json.loads((smoke_run / "summary.json").read_text())
    for task, result in summary["tasks"].items():
        assert result["final"] > result["initial"], (task, result)
    participants = sum(sum(r.get("participants", {}).values()) for r in rounds)
    assert participants == 2 * 9  # 2 rounds x (3 phones + 3 TVs + 3 watches), none failed
    assert all(r.get("failures", 0) == 0 and r.get("rejected", 0) == 0 for r in rounds)
