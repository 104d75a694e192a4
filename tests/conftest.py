"""Shared pytest fixtures, and what keeps the suite off the machine it runs on.

- Every test sees a temporary fedge cache: $FEDGE_CACHE points at a session-wide temp folder
  for the whole run (set before any test module is imported, so every default `cache_dir()`
  and every simulation the tests start resolve to it). Prepared data is copied in once from
  the user's cache when it is there (reading it is harmless and saves the tokenizing); whatever
  a test then writes goes to the temp folder, never to ~/.cache/fedge.
- Signal handlers (SIGTERM, SIGINT) are saved before each test's setup and restored after its
  teardown, so a handler a test or fixture installs never outlives it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The session's temporary fedge cache (the same folder $FEDGE_CACHE names)."""
    assert _session_cache is not None
    return _session_cache


@pytest.fixture(scope="module")
def flower_task_identity() -> Iterator[None]:
    """Building a Message outside a Flower runtime needs a task identity (Flower's internal
    `TaskIdentity`). Set it for a test module, then restore what was there."""
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
