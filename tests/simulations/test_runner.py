"""The process plumbing around `flwr run`: deadlines that hold on silent hangs, handlers restored.

Cheap: the subprocesses here are a few lines of Python, or `flwr run` on a folder that is not
an app (it fails in seconds), never a simulation.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from federation.errors import FedgeError
from simulations.runner import run_flwr, stream_output


def _python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _in_thread(proc: subprocess.Popen[str], timeout_s: float, lines: list[str]) -> list[BaseException | None]:
    """Run stream_output in a thread; give it 30 s at most (a hang must fail, not block pytest)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            stream_output(proc, lines.append, timeout_s, what="the sleeper")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)
    return outcome


def test_a_silent_hang_is_stopped_at_the_deadline() -> None:
    proc = _python("import time\nprint('started', flush=True)\ntime.sleep(120)")
    lines: list[str] = []
    try:
        start = time.monotonic()
        outcome = _in_thread(proc, 2.0, lines)
        assert outcome, "stream_output still waiting 30 s after a 2 s deadline"
        assert isinstance(outcome[0], FedgeError)
        assert "the sleeper did not finish within 2 s" in str(outcome[0])
        assert time.monotonic() - start < 15
        assert proc.wait(timeout=10) != 0  # killed
        assert lines == ["started\n"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_every_line_is_passed_on_and_a_finished_process_is_no_error() -> None:
    proc = _python("print('a')\nprint('b')")
    lines: list[str] = []
    outcome = _in_thread(proc, 20.0, lines)
    assert outcome == [None] and lines == ["a\n", "b\n"]
    assert proc.wait(timeout=10) == 0


def test_run_flwr_restores_the_sigterm_handler(tmp_path: Path) -> None:
    """run_flwr installs its own SIGTERM handler for the run; the caller's is back afterwards."""

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not expected to be called")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        lines: list[str] = []
        code = run_flwr({}, 1, on_line=lines.append, timeout_s=120, app_dir=tmp_path)  # not an app
        assert code != 0, lines
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_run_flwr_reports_a_deadline_it_missed(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match=r"flwr run did not finish within 0 s"):
        run_flwr({}, 1, timeout_s=0.01, app_dir=tmp_path)
