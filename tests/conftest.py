"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary fedge cache per test session: preprocessing runs once, never in ~/.cache."""
    return tmp_path_factory.mktemp("fedge-cache")
