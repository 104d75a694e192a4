"""Per-round progress lines, read from metrics.jsonl as the server appends it (no log parsing)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from server.status import CHECKED_IN, DONE, FAILED, WAITING, write_status
from simulations.progress import MetricsTail, RoundFollower, format_elapsed, round_line, status_line

ROUND_0 = {
    "round": 0,
    "eval": {"phone": {"top1": 0.0, "loss": 10.3}, "tv": {"auc": 0.537}, "sensor": {"accuracy": 0.001}},
    "federated": {"tv": {"auc": 0.665}},
}
ROUND_3 = {
    "round": 3,
    "eval": {"phone": {"top1": 0.0812}, "tv": {"auc": 0.5521}, "sensor": {"accuracy": 0.441}},
}


def test_a_round_line_names_the_round_each_primary_metric_and_the_elapsed_time() -> None:
    line = round_line(ROUND_3, 12, 102.4)
    assert line == "round 3/12: phone top1 0.0812, tv auc 0.5521, sensor accuracy 0.4410; elapsed 1m 42s"
    assert "\n" not in line


def test_round_zero_says_pretrained_and_shows_the_on_device_tv_metric_apart() -> None:
    line = round_line(ROUND_0, 12, 41)
    assert line.startswith("round 0/12 (pretrained start): phone top1 0.0000, tv auc 0.5370")
    assert "tv auc on devices 0.6650" in line and line.endswith("elapsed 41s")


def test_a_device_only_metric_is_shown_without_qualifier() -> None:
    entry = {"round": 2, "eval": {}, "federated": {"tv": {"auc": 0.61}}}
    assert round_line(entry, 2, 5) == "round 2/2: tv auc 0.6100; elapsed 5s"


def test_elapsed_format() -> None:
    assert [format_elapsed(s) for s in (0, 59.4, 60, 403)] == ["0s", "59s", "1m 00s", "6m 43s"]


def test_the_tail_reads_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 7}) + "\n")  # a reused --out folder: not news
    tail = MetricsTail(path)
    assert tail.read_new() == []
    with path.open("a") as f:
        f.write(json.dumps(ROUND_0) + "\n" + json.dumps(ROUND_3)[:20])  # round 3 half written
    assert [e["round"] for e in tail.read_new()] == [0]
    with path.open("a") as f:
        f.write(json.dumps(ROUND_3)[20:] + "\n")
    assert [e["round"] for e in tail.read_new()] == [3]
    assert tail.read_new() == []


def test_the_tail_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    tail = MetricsTail(tmp_path / "metrics.jsonl")
    assert tail.read_new() == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROUND_0) + "\n")
    assert [e["round"] for e in tail.read_new()] == [0]


def test_the_follower_reports_rounds_while_they_are_written_and_the_last_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    seen: list[tuple[int, float]] = []
    arrived = threading.Event()

    def on_entry(entry: dict) -> None:
        seen.append((entry["round"], time.monotonic()))
        arrived.set()

    with RoundFollower(path, on_entry, every_s=0.05):
        with path.open("a") as f:
            f.write(json.dumps(ROUND_0) + "\n")
        assert arrived.wait(5), "round 0 was not reported while the run was still going"
        with path.open("a") as f:
            f.write(json.dumps(ROUND_3) + "\n")  # written just before the end
    assert [r for r, _ in seen] == [0, 3]


def test_rounds_written_just_before_the_end_are_still_reported(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    seen: list[int] = []
    with RoundFollower(path, lambda entry: seen.append(entry["round"]), every_s=3600):
        path.write_text(json.dumps(ROUND_0) + "\n" + json.dumps(ROUND_3) + "\n")
    assert seen == [0, 3]


def test_the_last_rounds_twin_evaluations_are_said_once() -> None:
    entry = {**ROUND_3, "federated": {"phone": {"top1": 0.0812}, "tv": {"auc": 0.61}}}
    line = round_line(entry, 3, 10)
    assert line == (
        "round 3/3: phone top1 0.0812, tv auc 0.5521, tv auc on devices 0.6100, sensor accuracy 0.4410; "
        "elapsed 10s"
    )


def test_the_follower_reports_each_new_status_but_not_a_stale_one(tmp_path: Path) -> None:
    write_status(tmp_path, DONE, rounds=3)  # left by an earlier run in a reused folder: not news
    seen: list[str] = []
    with RoundFollower(tmp_path / "metrics.jsonl", lambda _e: None, every_s=3600, on_status=seen.append):
        write_status(tmp_path, WAITING, devices_wanted=9)
        write_status(tmp_path, CHECKED_IN, devices={"phone": 3, "tv": 3})
    # polled once at exit: the latest status is what a watcher sees
    assert [s["stage"] for s in seen] == [CHECKED_IN]
    assert status_line(seen[0]) == "devices checked in (3 phone, 3 tv); evaluating the start"


def test_status_lines_say_the_stage_in_words() -> None:
    assert status_line({"stage": WAITING, "devices_wanted": 9}) == "waiting for 9 devices to connect"
    assert status_line({"stage": FAILED, "error": "no CA"}) == "failed: no CA"
