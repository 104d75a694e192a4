"""`simulations.runner.run_flwr` retries once, saying so, when Flower's local SuperLink did not
start within Flower's fixed 15 s (`flwr/cli/local_superlink.py`), which a loaded machine can
cause before anything of the run has happened; any other failure is returned as it is.

A busy machine cannot be produced on demand, so the `flwr` the runner runs is here a
small script that answers the way Flower 1.42's `flwr run` does when that happens (its exact
message and exit code 1), then, on the next call, succeeds; it counts its calls.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from simulations import runner
from simulations.runner import SUPERLINK_RETRY_NOTE, SUPERLINK_SLOW_START, run_flwr


def _fake_flwr(bin_dir: Path, first_output: str, first_code: int) -> Path:
    calls = bin_dir / "calls"
    script = bin_dir / "flwr"
    script.write_text(
        "#!/bin/sh\n"
        f'echo call >> "{calls}"\n'
        f'if [ "$(wc -l < "{calls}")" -eq 1 ]; then echo "{first_output}"; exit {first_code}; fi\n'
        "echo 'run finished'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return calls


def test_a_slow_local_superlink_start_is_retried_once_with_a_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_flwr(tmp_path, f"Error: {SUPERLINK_SLOW_START} 15s. See logs at x.", 1)
    monkeypatch.setattr(runner.shutil, "which", lambda name, path=None: str(tmp_path / name))
    lines: list[str] = []
    code = run_flwr({"scenario": "smoke"}, 2, on_line=lines.append, log_path=tmp_path / "log", timeout_s=60)
    assert code == 0
    assert len(calls.read_text().splitlines()) == 2
    assert f"fedge: {SUPERLINK_RETRY_NOTE}" in lines and lines[-1] == "run finished"
    assert SUPERLINK_RETRY_NOTE in (tmp_path / "log").read_text()


def test_any_other_failure_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_flwr(tmp_path, "Error: unknown run config key", 1)
    monkeypatch.setattr(runner.shutil, "which", lambda name, path=None: str(tmp_path / name))
    lines: list[str] = []
    assert run_flwr({"scenario": "smoke"}, 2, on_line=lines.append, timeout_s=60) == 1
    assert len(calls.read_text().splitlines()) == 1
    assert not any(SUPERLINK_RETRY_NOTE in line for line in lines)
