"""Shared pytest fixtures."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary fedge cache per test session: preprocessing runs once, never in ~/.cache."""
    return tmp_path_factory.mktemp("fedge-cache")


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
