"""Shared pytest fixtures, and what keeps the suite off the machine it runs on.

- Every test sees a temporary fedge cache: $FEDGE_CACHE points at a session-wide temp folder
  for the whole run (set before any test module is imported, so every default `cache_dir()`
  and every simulation the tests start resolve to it). Prepared data is copied in once from
  the user's cache when it is there (reading it is harmless and saves the tokenizing); whatever
  a test then writes goes to the temp folder, never to ~/.cache/fedge.
- Signal handlers (SIGTERM, SIGINT) are saved before each test's setup and restored after its
  teardown, so a handler a test or fixture installs never outlives it.
- `RunProcesses` finds the processes a test's run starts as descendants of the test process or
  by a marker unique to the run in their environment (never by name across the machine, where
  another run may be going on), watches the sockets they use, and stops them at a deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

_PREPARED = ("phone-v1.pt", "tv-items-v1.pt", "tv-ratings-v1.pt")  # what the loaders write
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_session_cache: Path | None = None
_saved_cache_env: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point $FEDGE_CACHE at a fresh temp folder before collection imports any test module."""
    global _session_cache, _saved_cache_env
    _saved_cache_env = os.environ.get("FEDGE_CACHE")
    user_cache = Path(_saved_cache_env) if _saved_cache_env else Path.home() / ".cache" / "fedge"
    _session_cache = Path(tempfile.mkdtemp(prefix="fedge-test-cache-"))
    for name in _PREPARED:
        source = user_cache / name
        if source.is_file():
            shutil.copyfile(source, _session_cache / name)
    os.environ["FEDGE_CACHE"] = str(_session_cache)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _saved_cache_env is None:
        os.environ.pop("FEDGE_CACHE", None)
    else:
        os.environ["FEDGE_CACHE"] = _saved_cache_env
    if _session_cache is not None:
        shutil.rmtree(_session_cache, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Restore the signal handlers after each test (setup, call and teardown all included)."""
    saved = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@dataclass(frozen=True)
class SocketUse:
    pid: int
    process: str
    kind: str  # "listen" (TCP), "udp" (bound), "connected" (TCP, to raddr)
    ip: str
    port: int


class RunProcesses:
    """The processes a run started from this test, their sockets, and a deadline on them.

    A process belongs to the run if it is a descendant of this (pytest) process, or carries
    `RUN_MARKER=<this run's id>` in its environment: every process the run starts inherits the
    marker, also daemons that were reparented away from us. Sampled every `every_s` seconds from
    a thread; past `deadline_s`, every process of the run is killed (the run then fails, and
    `timed_out` says why).
    """

    RUN_MARKER = "FEDGE_TEST_RUN"

    def __init__(self, deadline_s: float, every_s: float = 0.5) -> None:
        self.deadline_s, self.every_s = deadline_s, every_s
        self.run_id = uuid.uuid4().hex
        self.seen: dict[int, psutil.Process] = {}
        self.names: dict[int, str] = {}  # pid -> command, as seen while it ran
        self.sockets: set[SocketUse] = set()
        self.timed_out = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._before: set[int] = set()
        self._saved_marker: str | None = None

    def __enter__(self) -> RunProcesses:
        self._saved_marker = os.environ.get(self.RUN_MARKER)
        os.environ[self.RUN_MARKER] = self.run_id
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._saved_marker is None:
            os.environ.pop(self.RUN_MARKER, None)
        else:
            os.environ[self.RUN_MARKER] = self._saved_marker

    def current(self) -> list[psutil.Process]:
        """The run's processes alive now (zombies excluded)."""
        found = {p.pid: p for p in psutil.Process().children(recursive=True) if p.pid not in self._before}
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in found or proc.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error, OSError):
                if proc.environ().get(self.RUN_MARKER) == self.run_id:
                    found[proc.pid] = proc
        return [p for p in found.values() if _alive(p)]

    def leftovers(self) -> list[str]:
        """Processes of the run still running (checked after the run returned)."""
        alive = {p.pid: p for p in self.seen.values() if _alive(p)}
        alive.update({p.pid: p for p in self.current()})
        # the command as first seen too: a process being torn down may show no command line
        return [f"{p.pid} {_name(p)} ({self.names.get(p.pid, '?')}; {_status(p)})" for p in alive.values()]

    def non_loopback(self) -> list[SocketUse]:
        return sorted((s for s in self.sockets if not _is_loopback(s.ip)), key=str)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            procs = self.current()
            for proc in procs:
                if proc.pid not in self.seen:
                    self.seen[proc.pid] = proc
                    self.names[proc.pid] = _name(proc)
                self._record_sockets(proc)
            if time.monotonic() - self._start > self.deadline_s:
                self.timed_out = True
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()

    def _record_sockets(self, proc: psutil.Process) -> None:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.Error, OSError):
            return
        name = _name(proc)
        for c in conns:
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                self.sockets.add(SocketUse(proc.pid, name, "listen", c.laddr.ip, c.laddr.port))
            elif c.type == socket.SOCK_DGRAM and c.laddr:
                self.sockets.add(SocketUse(proc.pid, name, "udp", c.laddr.ip, c.laddr.port))
            if c.raddr:
                self.sockets.add(SocketUse(proc.pid, name, "connected", c.raddr.ip, c.raddr.port))


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _status(proc: psutil.Process) -> str:
    try:
        return f"{proc.status()}, parent {proc.ppid()}"
    except psutil.Error:
        return "gone"


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:3])[:200] or proc.name()
    except psutil.Error:
        return "?"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The session's temporary fedge cache (the same folder $FEDGE_CACHE names)."""
    assert _session_cache is not None
    return _session_cache


@pytest.fixture(scope="module")
def flower_task_identity() -> Iterator[None]:
    """Building a Message outside a Flower runtime needs a task identity (internal API;
    docs/architecture.md, "Flower 1.42 facts"). Set it for a test module, then restore what was there."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def app() -> Any:
    """fedge's real ClientApp, called in-process."""
    from clients.client_app import app

    return app


@pytest.fixture(scope="session")
def run_processes() -> type[RunProcesses]:
    """`with run_processes(deadline_s) as procs: <start a run>`; see RunProcesses."""
    return RunProcesses


@contextlib.contextmanager
def _restored_registries() -> Iterator[None]:
    """Device classes, scenarios and tasks a test adds stay in that test (the registries are
    process-wide): what was registered before is put back afterwards."""
    from federation import devices, scenarios, tasks

    registries = (devices._added, scenarios._loaded, tasks._resolved)
    saved = tuple(dict(r) for r in registries)
    yield
    for registry, before in zip(registries, saved, strict=True):
        registry.clear()
        registry.update(before)
    devices._in_force.clear()  # rebuilt from the built-in catalogue + what was added before


@pytest.fixture(scope="session")
def restored_registries() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """`with restored_registries(): ...` (see `_restored_registries`)."""
    return _restored_registries
