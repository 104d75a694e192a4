"""A run whose server is killed after round 1, resumed from its folder, ends where an
uninterrupted run with the same seed ends (secure aggregation off: a plain sum).

Three simulations through Flower (`fedge simulate`, each in its own process group, every process
stopped by the run's token): an uninterrupted reference; a run killed as soon as round 1's
checkpoint is on disk (its ServerApp, the simulation and fedge itself); `fedge simulate --resume`.
The resumed run must run round 2 only, once, and reach the reference's final held-out metrics.

The fleet is phones and watches: a phone's MiniLM uses dropout, whose draws come from torch's
global RNG, so this also checks that local training seeds it from the run (not the process).
TVs are left out: a TV's private part lives on the device for the run (Flower's node state),
and a new run (the resumed one) starts every device afresh.

Slow: three simulations (~1 min each on 2 cores).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.runner import TOKEN_VAR, stop_processes

pytestmark = pytest.mark.slow
FEDGE = str(Path(sys.executable).parent / "fedge")
SCENARIO = """
[scenario]
name = "resume-check"
description = "2 phones and 2 watches, all every round"
fleet = { "phone/low" = 1, "phone/high" = 1, "sensor/low" = 1, "sensor/high" = 1 }
per_round = { phone = 2, sensor = 2 }
rounds = 2
local_steps = { phone = 6, sensor = 20 }
eval_cap = { phone = 256, sensor = 100000 }
device_clock = false
"""
SETS = ["--set", "secure-aggregation=false", "--set", "federated-eval-every=-1"]
DEADLINE_S = 600


def _rounds(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _fedge(args: list[str], token: str) -> subprocess.Popen[str]:
    env = {**os.environ, TOKEN_VAR: token}
    return subprocess.Popen(
        [FEDGE, "simulate", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(args: list[str]) -> str:
    token = secrets.token_hex(8)
    try:
        proc = _fedge(args, token)
        output, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, output[-3000:]
        return output
    finally:
        stop_processes(token)


def test_a_killed_run_resumes_after_its_last_round_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    scenario = tmp_path / "resume-check.toml"
    scenario.write_text(SCENARIO)
    common = ["--scenario", str(scenario), "--rounds", "2", "--seed", "7", *SETS]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _finish([*common, "--out", str(reference)])

    token = secrets.token_hex(8)
    try:
        proc = _fedge([*common, "--out", str(crashed)], token)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            info = crashed / "checkpoint.json"
            if info.exists() and json.loads(info.read_text() or "{}").get("round") == 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        killed = stop_processes(token, grace_s=0.5)  # the ServerApp, the simulation and fedge itself
    assert killed > 0
    assert [e["round"] for e in _rounds(crashed)] == [0, 1], "round 2 finished before the kill: inconclusive"

    output = _finish(["--resume", str(crashed)])
    resumed, ref = _rounds(crashed), _rounds(reference)
    assert [e["round"] for e in resumed] == [0, 1, 2], output[-2000:]  # round 2 once, rounds 0-1 kept
    assert "resumed from" in (crashed / "flwr.log").read_text()
    for server_round in (1, 2):  # round 1 as the reference's before the kill, round 2 after the resume
        for task, metrics in ref[server_round]["eval"].items():
            for name, value in metrics.items():
                got = resumed[server_round]["eval"][task][name]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (server_round, task, name)
        assert resumed[server_round]["train_loss"] == pytest.approx(ref[server_round]["train_loss"], rel=1e-5)
