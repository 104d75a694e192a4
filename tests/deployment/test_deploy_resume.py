"""The server of a deployed run killed after round 1, resumed with `fedge deploy run --resume`,
ends where an uninterrupted run on the same deployment with the same seed ends (secure
aggregation off: a plain sum, so the two runs can be compared number for number).

One local deployment (TLS, node authentication; three watches on 127.0.0.1) serves three runs,
each started with the `fedge deploy run` command in its own process group: an uninterrupted
reference; a run whose ServerApp process (`flwr-serverapp`, started by the SuperLink) is killed
with SIGKILL, together with the command, as soon as round 1's checkpoint is on disk, the
SuperLink and SuperNodes staying up; and `fedge deploy run --resume`, which must run round 2
only, once, from the checkpoint, and reach the reference's held-out metrics and train losses.
Every process is stopped by PID at the end. Slow (four deployed rounds on two cores): `-m slow`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from simulations.deploy import down, processes_with_token, up

pytestmark = pytest.mark.slow
FEDGE = str(Path(sys.executable).parent / "fedge")
DEADLINE_S = 900
SETS = ["--set", "secure-aggregation=false", "--set", "federated-eval-every=-1"]


def _rounds(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _deploy_run(directory: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FEDGE, "deploy", "run", "--dir", str(directory), *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> str:
    output, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, output[-3000:]
    return output


def test_a_deployed_run_whose_server_was_killed_resumes_and_ends_as_an_uninterrupted_one(
    tmp_path: Path, run_processes: Any
) -> None:
    directory = tmp_path / "deployment"
    reference = tmp_path / "reference"
    common = ["--rounds", "2", "--seed", "7", *SETS]
    with run_processes(deadline_s=3 * DEADLINE_S) as procs:
        state = up("deploy-check", directory)
        try:
            _finish(_deploy_run(directory, [*common, "--out", str(reference)]))
            crashing = _deploy_run(directory, common)  # out: <directory>/results/<timestamp>
            deadline = time.monotonic() + DEADLINE_S
            crashed: Path | None = None
            while time.monotonic() < deadline and crashing.poll() is None:
                infos = sorted((directory / "results").glob("*/checkpoint.json"))
                if infos and json.loads(infos[-1].read_text() or "{}").get("round") == 1:
                    crashed = infos[-1].parent
                    break
                time.sleep(0.1)
            assert crashing.poll() is None and crashed is not None, "the run ended before it could be killed"
            servers = [
                p for p in processes_with_token(state.token) if "flwr-serverapp" in " ".join(p.cmdline())
            ]
            assert servers, "no ServerApp process found to kill"
            os.killpg(crashing.pid, signal.SIGKILL)  # the command and its `flwr run`
            for server in servers:
                with contextlib.suppress(psutil.Error):
                    server.kill()
            crashing.wait(timeout=30)
            assert [e["round"] for e in _rounds(crashed)] == [0, 1], (
                "round 2 ran before the kill: inconclusive"
            )
            output = _finish(_deploy_run(directory, ["--resume"]))
        finally:
            down(state)
    assert not procs.timed_out and not procs.leftovers(), procs.leftovers()
    resumed, ref = _rounds(crashed), _rounds(reference)
    assert [e["round"] for e in resumed] == [0, 1, 2], output[-2000:]  # round 2 once, rounds 0-1 kept
    assert "resumed from" in (crashed / "flwr-run.log").read_text()
    for server_round in (1, 2):  # round 1 from before the kill, round 2 from after the resume
        for task, metrics in ref[server_round]["eval"].items():
            for name, value in metrics.items():
                got = resumed[server_round]["eval"][task][name]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (server_round, task, name)
        assert resumed[server_round]["train_loss"] == pytest.approx(ref[server_round]["train_loss"], rel=1e-5)
