"""The warm executor's own parts: which modules a task process drops, the poll interval it reads,
and the fork that runs a task (its exit status, its isolation from the parent). The executor
serving a real SuperNode is tested with the deployment (tests/deployment/test_deploy_local.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from clients import warm_executor
from clients.warm_executor import (
    DEFAULT_POLL_S,
    POLL_ENV,
    Children,
    drop_app_modules,
    poll_interval,
    preload,
    run_task_in_child,
)


def test_only_the_apps_own_modules_are_dropped() -> None:
    modules: dict[str, object] = dict.fromkeys(
        [
            "clients",
            "clients.client_app",
            "federation.local",
            "server.loop",
            "simulations.cli",
            "torch",
            "torch.nn",
            "peft",
            "flwr.app",
            "clientsx",
            "federationist.core",
        ]
    )
    dropped = drop_app_modules(modules)
    assert sorted(dropped) == [
        "clients",
        "clients.client_app",
        "federation.local",
        "server.loop",
        "simulations.cli",
    ]
    # third-party modules stay warm, and a package that merely starts with an app name is not the app's
    assert sorted(modules) == ["clientsx", "federationist.core", "flwr.app", "peft", "torch", "torch.nn"]


def test_a_task_process_imports_the_apps_code_anew(tmp_path: Path) -> None:
    # the warm process imported one version of the app; the task's FAB brings another
    (tmp_path / "v1" / "clients").mkdir(parents=True)
    (tmp_path / "v1" / "clients" / "__init__.py").write_text("")
    (tmp_path / "v1" / "clients" / "probe_version.py").write_text("VERSION = 1\n")
    (tmp_path / "v2" / "clients").mkdir(parents=True)
    (tmp_path / "v2" / "clients" / "__init__.py").write_text("")
    (tmp_path / "v2" / "clients" / "probe_version.py").write_text("VERSION = 2\n")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path / "v1")!r})
import clients.probe_version
assert clients.probe_version.VERSION == 1
from clients_warm import run_task_in_child
import os
def task():
    sys.path.insert(0, {str(tmp_path / "v2")!r})
    import clients.probe_version
    sys.exit(40 + clients.probe_version.VERSION)
pid = run_task_in_child(task)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    # the executor's module under another name, so that dropping `clients` does not drop it
    shim = tmp_path / "clients_warm.py"
    shim.write_text(Path(sys.modules["clients.warm_executor"].__file__).read_text())  # type: ignore[arg-type]
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"  # the task ran v2, the FAB's, not the warm process's v1


def test_the_poll_interval_is_flowers_variable_checked() -> None:
    assert poll_interval({}) == DEFAULT_POLL_S
    assert poll_interval({POLL_ENV: "0.5"}) == 0.5
    for bad in ("0", "61", "soon", "nan"):
        with pytest.raises(ValueError, match=POLL_ENV):
            poll_interval({POLL_ENV: bad})


def test_a_task_runs_in_a_child_and_its_exit_status_is_reported(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    children = Children()

    def task() -> None:
        marker.write_text(str(os.getpid()))
        sys.exit(3)  # as Flower's run_clientapp ends: sys.exit after its exit handlers

    children.pids.add(run_task_in_child(task))
    ended: list[tuple[int, int]] = []
    deadline = time.monotonic() + 30
    while not ended and time.monotonic() < deadline:
        ended = children.reap()
        time.sleep(0.02)
    assert [code for _, code in ended] == [3]
    assert int(marker.read_text()) != os.getpid()  # it ran in another process
    assert not children.pids


def test_a_crashing_task_takes_down_its_child_only() -> None:
    children = Children()

    def task() -> None:
        raise RuntimeError("a ClientApp bug")

    children.pids.add(run_task_in_child(task))
    deadline = time.monotonic() + 30
    ended: list[tuple[int, int]] = []
    while not ended and time.monotonic() < deadline:
        ended = children.reap()
        time.sleep(0.02)
    assert [code for _, code in ended] == [1]  # and this (the parent) goes on


def test_stopping_ends_a_hung_task() -> None:
    children = Children()
    children.pids.add(run_task_in_child(lambda: time.sleep(600)))
    started = time.monotonic()
    children.stop(grace_s=5.0)
    assert not children.pids
    assert time.monotonic() - started < 10


def test_sigterm_stops_an_executor_whose_supernode_is_gone(tmp_path: Path) -> None:
    """With its SuperNode gone, the executor's call to the Runtime API retries; a SIGTERM
    (`fedge deploy down`) must still end it at once, not after the retries."""
    import signal
    import socket
    import subprocess

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "executor.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clients.warm_executor",
                "--runtime-api-address",
                f"127.0.0.1:{port}",
                "--insecure",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
        )
    try:
        deadline = time.monotonic() + 120
        while "imported the ClientApp runtime" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(3)  # well into its retries
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail("the executor ignored SIGTERM while its SuperNode was gone")


def test_a_module_that_fails_to_preload_is_reported_and_the_rest_still_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # not in this (pytest's) process: dropping fedge's modules here would leave every later test
    # with a second copy of each fedge class
    monkeypatch.setattr(warm_executor, "drop_app_modules", lambda modules: [])
    sys.modules.pop("tabnanny", None)
    took, failed = preload(["json", "fedge_no_such_module", "tabnanny"])
    assert took >= 0
    assert list(failed) == ["fedge_no_such_module"]
    assert "ModuleNotFoundError" in failed["fedge_no_such_module"]
    assert "tabnanny" in sys.modules  # the one after the failure was still imported
