"""The run's status.json (server/status.py): the documented contract between the server and
whoever watches a run (`fedge simulate`'s progress and error message), in place of log text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from server.server_app import main
from server.status import CHECKED_IN, DONE, FAILED, STATUS_FILE, read_status, write_status


def test_a_status_is_written_whole_and_read_back(tmp_path: Path) -> None:
    write_status(tmp_path, CHECKED_IN, devices={"phone": 3})
    assert read_status(tmp_path) == {"stage": CHECKED_IN, "devices": {"phone": 3}}
    write_status(tmp_path, DONE, rounds=2)
    assert read_status(tmp_path) == {"stage": DONE, "rounds": 2}
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_FILE]  # no scratch file left behind


def test_an_unknown_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown run stage"):
        write_status(tmp_path, "half-done")


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"stage": "exploded"}', '{"no": "stage"}'])
def test_a_missing_or_foreign_file_reads_as_no_status(tmp_path: Path, text: str) -> None:
    assert read_status(tmp_path) is None
    (tmp_path / STATUS_FILE).write_text(text)
    assert read_status(tmp_path) is None


def _context(run_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def test_a_refused_run_config_leaves_its_reason_in_the_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="local-steps"):
        main(None, _context({"out-dir": str(out), "local-steps": "many"}))  # type: ignore[arg-type]
    status = json.loads((out / STATUS_FILE).read_text())
    assert status["stage"] == FAILED
    assert "local-steps" in status["error"] and "must be an int" in status["error"]


def test_a_crash_is_recorded_and_still_raised(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A valid config and no grid: the server fails on its first use of the grid, not on the config.
    with pytest.raises(AttributeError):
        main(None, _context({"out-dir": str(out), "scenario": "smoke"}))  # type: ignore[arg-type]
    status = read_status(out)
    assert status is not None and status["stage"] == FAILED
    assert status["error"].startswith("AttributeError")
