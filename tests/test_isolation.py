"""The suite runs off the machine's state: its cache is a temporary folder, not ~/.cache/fedge,
and a signal handler a test installs is gone after it (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from federation.data.common import cache_dir as default_cache_dir


def test_the_default_cache_is_the_sessions_temporary_folder(cache_dir: Path) -> None:
    resolved = default_cache_dir()  # what every loader and simulation uses without an override
    assert resolved == cache_dir
    assert resolved != Path.home() / ".cache" / "fedge"
    assert resolved.is_relative_to(Path(tempfile.gettempdir()))
    assert os.environ["FEDGE_CACHE"] == str(cache_dir)


def test_a_handler_a_test_installs_does_not_outlive_it_part_1() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # part 2, run next, must not see this


def test_a_handler_a_test_installs_does_not_outlive_it_part_2() -> None:
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
