"""Per-round progress of a run, read from its `metrics.jsonl` as the server writes it.

The server appends one JSON object per round (round 0 is the pretrained start) and flushes it
when the round ends; `fedge simulate` follows that file, rather than parsing Flower's log text,
to move its progress bar on a terminal or to print one plain line per round when stdout is a
pipe or a file (CI, `| tee`, a log). What happens outside the rounds (check-in, a failure) it
reads from the server's status.json beside it (server/status.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.metrics import PRIMARY_METRIC
from server.status import CHECKED_IN, FAILED, WAITING, read_status


class MetricsTail:
    """The complete lines appended to a metrics.jsonl since this tail was made.

    Lines already in the file (a reused `--out` folder, a resumed run) are not news; a line
    is only read once its newline is written, so a half-written line is never parsed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        entries = []
        for line in chunk[:end].splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # not ours to judge here: the report reads the file too
                continue
            if isinstance(entry, dict) and isinstance(entry.get("round"), int):
                entries.append(entry)
        return entries


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def round_metrics(entry: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """(task, metric, value, where) of each task's primary held-out metric in one round's entry:
    server-side where the server evaluates the task, else on the devices ("devices")."""
    found = []
    tasks = dict.fromkeys([*entry.get("eval", {}), *entry.get("federated", {})])
    for task in tasks:
        metric = PRIMARY_METRIC.get(task)
        if metric is None:
            continue
        for source, where in (("eval", "server"), ("federated", "devices")):
            value = entry.get(source, {}).get(task, {}).get(metric)
            if value is not None:
                found.append((task, metric, float(value), where))
    return found


def round_line(entry: dict[str, Any], total_rounds: int, elapsed_s: float) -> str:
    """One plain line for one round: number, each task's primary metric, time since the start."""
    number = entry["round"]
    label = f"round {number}/{total_rounds}" + (" (pretrained start)" if number == 0 else "")
    found = round_metrics(entry)
    server_side = {task: f"{value:.4f}" for task, _, value, where in found if where == "server"}
    parts = []
    for task, metric, value, where in found:
        shown = f"{value:.4f}"
        if where == "devices" and task in server_side:
            if shown == server_side[task]:
                continue  # the same held-out data evaluated twice (the last round): say it once
            # evaluated both ways and they differ (TV: cold start on the server, personalised on the TVs)
            parts.append(f"{task} {metric} on devices {shown}")
        else:
            parts.append(f"{task} {metric} {shown}")
    metrics = ", ".join(parts) if parts else "no evaluation"
    return f"{label}: {metrics}; elapsed {format_elapsed(elapsed_s)}"


def status_line(status: dict[str, Any]) -> str:
    """A few words for the run's stage outside its rounds (server/status.py's status.json)."""
    stage = status["stage"]
    if stage == WAITING:
        return f"waiting for {status.get('devices_wanted', 'the')} devices to connect"
    if stage == CHECKED_IN:
        devices = status.get("devices") or {}
        counted = ", ".join(f"{n} {cls}" for cls, n in devices.items())
        return f"devices checked in ({counted}); evaluating the start" if counted else "devices checked in"
    if stage == FAILED:
        return f"failed: {status.get('error', 'no reason recorded')}"
    return stage


class RoundFollower:
    """Calls `on_entry` for each round's entry as it lands in metrics.jsonl and, when given,
    `on_status` for each new status.json of the same folder (one polling thread).

    A status already there when the follower starts (a reused `--out` folder, a resumed run) is
    not news, like metrics lines already written."""

    def __init__(
        self,
        path: Path,
        on_entry: Callable[[dict[str, Any]], None],
        every_s: float = 0.5,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.tail = MetricsTail(path)
        self.on_entry = on_entry
        self.on_status = on_status
        self.every_s = every_s
        self._last_status = read_status(path.parent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        if self.on_status is not None:
            status = read_status(self.tail.path.parent)
            if status is not None and status != self._last_status:
                self._last_status = status
                self.on_status(status)
        for entry in self.tail.read_new():
            self.on_entry(entry)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._poll()

    def __enter__(self) -> RoundFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the last rounds, written just before the run ended
