"""Tables and plots of an experiment from its saved cells (`fedge report DIR`).

An experiment folder holds one folder per cell under `cells/`, each with `cell.json` (what the
cell is: method, scenario, setting, seed, kind, the run settings, and its tasks' primary
metrics) and `metrics.jsonl` in a run's format (a federated run's, or a reference's: round 0 and
the last round). Everything here is computed from those files alone, so the report can be
rebuilt at any time, also from an interrupted experiment (unfinished cells are left out).

The table math is pure (`cell_row`, `mean_std`, `aggregate`): a row per cell, then mean +- std
(sample standard deviation, n - 1) over the seeds of each (kind, method, scenario, setting).
Per task, the final held-out metric is the server-side one of the last line (the union of the
fleet's held-out splits; for a personalised task its shared part alone) where the cell has it,
else the on-device one (local-only: each device's own split, sums added); a personalised task
(TV) gets a second column, on the devices with each viewer's private part.

Beside the cells, every report carries, on the same held-out data, the pretrained start (round 0
of a federated run: every method of a seed starts from the same model, LoRA's B being zero) and
the simple baselines each run computes (`summary.json`: majority class, unigram and bigram
counts, item popularity, a viewer's mean; a baseline the task computes on the devices fills the
on-device column), grouped over seeds like the cells (`start_rows`, `baseline_rows`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.errors import FedgeError

CELL_FILE = "cell.json"
DONE_FILE = "done.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"  # a federated run's summary: its tasks' simple baselines
START = "pretrained start"


@dataclass(frozen=True)
class Column:
    """One metric column: a task's primary metric, from the server (`eval`) or on devices."""

    task: str
    metric: str
    on_devices: bool  # the personalised column (on devices, with the private part)

    @property
    def name(self) -> str:
        return f"{self.task} {self.metric}" + (" (on devices)" if self.on_devices else "")


def columns(tasks: Mapping[str, Mapping[str, Any]]) -> list[Column]:
    """The metric columns of tasks `{task: {"metric": m, "personalised": bool}}`, in order."""
    out = []
    for task, info in tasks.items():
        out.append(Column(task, str(info["metric"]), False))
        if info.get("personalised"):
            out.append(Column(task, str(info["metric"]), True))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl lines; a damaged file is refused naming its line."""
    lines = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            raise FedgeError(f"{path}: line {n} is not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
            raise FedgeError(f"{path}: line {n} has no integer `round`")
        lines.append(entry)
    return lines


def value_at(entry: Mapping[str, Any], column: Column) -> float | None:
    """The column's value in one metrics.jsonl line: on devices for a personalised column, else
    server-side, falling back to on devices (a reference with no central model)."""
    sources = ("federated",) if column.on_devices else ("eval", "federated")
    for source in sources:
        value = entry.get(source, {}).get(column.task, {}).get(column.metric)
        if value is not None:
            return float(value)
    return None


def curve(lines: Sequence[Mapping[str, Any]], column: Column) -> list[tuple[int, float]]:
    """(round, value) of every line that has the column: server-side every round for a shared
    model, on devices every `federated-eval-every` rounds for a personalised one."""
    source = "federated" if column.on_devices else "eval"
    points = []
    for entry in lines:
        value = entry.get(source, {}).get(column.task, {}).get(column.metric)
        if value is not None:
            points.append((int(entry["round"]), float(value)))
    return points


def epsilon(lines: Sequence[Mapping[str, Any]]) -> float | None:
    """The run's cumulative differential-privacy epsilon (`privacy.epsilon` of its last line that
    has one), or None for a run without differential privacy."""
    found = [
        e["privacy"]["epsilon"]
        for e in lines
        if isinstance(e.get("privacy"), dict) and "epsilon" in e["privacy"]
    ]
    return float(found[-1]) if found else None


def simulated_hours(lines: Sequence[Mapping[str, Any]]) -> float | None:
    """Simulated time from the start of the first training round to the end of the last (the
    device clock: `clock.sim_time_s` is a round's start, `clock.simulated_s` its length)."""
    clocked = [e["clock"] for e in lines if isinstance(e.get("clock"), dict)]
    if not clocked:
        return None
    return (clocked[-1]["sim_time_s"] + clocked[-1]["simulated_s"] - clocked[0]["sim_time_s"]) / 3600.0


def method_name(cell: Mapping[str, Any]) -> str:
    """A cell's method as the report shows it: a reference trained on a method's run's examples
    (`examples-of`) says so, since the plan's examples give another reference."""
    name = str(cell.get("method"))
    return name + (f" (examples of {cell['examples_of']})" if cell.get("examples_of") else "")


def cell_row(
    cell: Mapping[str, Any], lines: Sequence[Mapping[str, Any]], cols: Sequence[Column]
) -> dict[str, Any]:
    """One cell's row: who it is, each column's final value, upload bytes, simulated hours, epsilon."""
    if not lines:
        raise FedgeError(f"cell {cell.get('id')}: metrics.jsonl is empty")
    last = max(lines, key=lambda e: e["round"])
    row: dict[str, Any] = {k: cell.get(k) for k in ("kind", "method", "scenario", "setting", "seed")}
    row["method"] = method_name(cell)
    row["rounds"] = last["round"]
    for col in cols:
        row[col.name] = value_at(last, col)
    row["upload MB"] = sum(float(e.get("upload_bytes", 0)) for e in lines) / 1e6
    row["simulated h"] = simulated_hours(lines)
    row["epsilon"] = epsilon(lines)
    return row


def _reference_row(kind: str, method: str, cell: Mapping[str, Any]) -> dict[str, Any]:
    """A row that is no cell (the start, a baseline): nothing uploaded, no simulated time."""
    row = {k: cell.get(k) for k in ("scenario", "seed")}
    return {"kind": kind, "method": method, "setting": "-", **row, "rounds": 0,
            "upload MB": None, "simulated h": None, "epsilon": None}  # fmt: skip


def start_rows(
    cells: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], cols: Sequence[Column]
) -> list[dict[str, Any]]:
    """The pretrained start of each (scenario, seed): round 0 of its first federated run cell
    (every method of a seed starts from the same model and scores it on the same held-out data)."""
    seen, out = set(), []
    for cell, lines in cells:
        key = (cell.get("scenario"), cell.get("seed"))
        first = min(lines, key=lambda e: e["round"]) if lines else None
        if cell.get("kind") != "run" or key in seen or first is None or first["round"] != 0:
            continue
        seen.add(key)
        row = _reference_row("start", START, cell)
        for col in cols:
            row[col.name] = value_at(first, col)
        out.append(row)
    return out


def baseline_rows(
    summaries: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], cols: Sequence[Column]
) -> list[dict[str, Any]]:
    """One row per (simple baseline, scenario, seed) from federated runs' summaries (the first
    run of each (scenario, seed)): each task's baselines fill its server-side column, or its
    on-device column for a baseline the task computes on the devices (`device_baselines`)."""
    seen, rows = set(), {}
    for cell, summary in summaries:
        key = (cell.get("scenario"), cell.get("seed"))
        if cell.get("kind") != "run" or key in seen:
            continue
        seen.add(key)
        tasks = summary.get("tasks", {})
        for col in cols:
            task = tasks.get(col.task, {})
            on_devices = set(task.get("device_baselines", []))
            for name, metrics in task.get("baselines", {}).items():
                if (name in on_devices) != col.on_devices or col.metric not in metrics:
                    continue
                row = rows.setdefault((name, *key), _reference_row("baseline", f"baseline: {name}", cell))
                row[col.name] = float(metrics[col.metric])
    return [{**{c.name: None for c in cols}, **row} for row in rows.values()]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (n - 1; 0 for one value), n) of the values that are not None."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


GROUP = ("kind", "method", "scenario", "setting")
NUMERIC_EXTRA = ("upload MB", "simulated h", "epsilon")


@dataclass
class Aggregate:
    """mean +- std over seeds of one (kind, method, scenario, setting)."""

    key: dict[str, Any]
    seeds: list[int]
    stats: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)


def aggregate(rows: Sequence[Mapping[str, Any]], cols: Sequence[Column]) -> list[Aggregate]:
    """Rows grouped by (kind, method, scenario, setting), in first-seen order, each numeric
    column's mean +- std over the group's seeds."""
    groups: dict[tuple, Aggregate] = {}
    for row in rows:
        key = tuple(row.get(k) for k in GROUP)
        group = groups.setdefault(key, Aggregate(dict(zip(GROUP, key, strict=True)), []))
        group.seeds.append(row.get("seed"))
    for key, group in groups.items():
        members = [r for r in rows if tuple(r.get(k) for k in GROUP) == key]
        for name in [c.name for c in cols] + list(NUMERIC_EXTRA):
            group.stats[name] = mean_std(r.get(name) for r in members)
    return list(groups.values())


def fmt(stat: tuple[float | None, float | None, int], digits: int = 3) -> str:
    mean, std, n = stat
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def markdown_table(groups: Sequence[Aggregate], cols: Sequence[Column]) -> str:
    """A Markdown table of mean ± std over seeds (the epsilon column only when a cell has one)."""
    show_eps = any(g.stats["epsilon"][0] is not None for g in groups)
    extra = ["upload MB", "simulated h"] + (["epsilon"] if show_eps else [])
    head = ["method", "kind", "scenario", "setting", "seeds", *[c.name for c in cols], *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [str(g.key["method"]), str(g.key["kind"]), str(g.key["scenario"]), str(g.key["setting"])]
        cells.append(str(len(g.seeds)))
        cells += [fmt(g.stats[c.name]) for c in cols]
        cells += [fmt(g.stats[e], 1 if e == "upload MB" else 2) for e in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, groups: Sequence[Aggregate], cols: Sequence[Column]) -> None:
    names = [c.name for c in cols] + list(NUMERIC_EXTRA)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([*GROUP, "seeds", *[f"{n} {s}" for n in names for s in ("mean", "std")]])
        for g in groups:
            values: list[Any] = []
            for n in names:
                mean, std, _ = g.stats[n]
                values += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}"]
            out.writerow([*(g.key[k] for k in GROUP), " ".join(map(str, g.seeds)), *values])


# -- reading an experiment folder -------------------------------------------------------------


def _finished_dirs(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, cell.json) of every finished cell under `directory/cells`, in cell order."""
    cells_dir = directory / "cells"
    if not cells_dir.is_dir():
        raise FedgeError(f"{directory} is not an experiment folder (no cells/): run `fedge experiment` first")
    found = []
    for cell_dir in sorted(p for p in cells_dir.iterdir() if p.is_dir()):
        if not (cell_dir / DONE_FILE).is_file() or not (cell_dir / METRICS_FILE).is_file():
            continue
        try:
            cell = json.loads((cell_dir / CELL_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise FedgeError(f"{cell_dir / CELL_FILE} is missing or damaged") from None
        found.append((cell_dir, cell))
    found.sort(key=lambda c: c[1].get("order", 0))
    return found


def finished_cells(directory: Path) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(cell.json, metrics lines) of every finished cell under `directory/cells`, in cell order."""
    return [(cell, read_metrics(cell_dir / METRICS_FILE)) for cell_dir, cell in _finished_dirs(directory)]


def run_summaries(directory: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(cell.json, summary.json) of every finished federated run cell that left a summary; a
    damaged summary is refused naming its file."""
    out = []
    for cell_dir, cell in _finished_dirs(directory):
        path = cell_dir / SUMMARY_FILE
        if cell.get("kind") != "run" or not path.is_file():
            continue
        try:
            out.append((cell, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            raise FedgeError(f"{path} is damaged: rerun its cell (delete {cell_dir / DONE_FILE})") from None
    return out


def task_table(cells: Sequence[tuple[Mapping[str, Any], Any]]) -> dict[str, dict[str, Any]]:
    """{task: {"metric", "personalised"}} over every cell, in first-seen order."""
    tasks: dict[str, dict[str, Any]] = {}
    for cell, _ in cells:
        for task, info in cell.get("tasks", {}).items():
            tasks.setdefault(task, dict(info))
    return tasks


def build_report(directory: Path) -> tuple[list[dict[str, Any]], list[Aggregate], list[Column]]:
    """Every finished cell's row, the groups over seeds (the cells', then the pretrained start's
    and the simple baselines') and the columns, and writes results.csv, cells.csv (the cells
    only), results.md and plots/ into `directory`."""
    cells = finished_cells(directory)
    if not cells:
        raise FedgeError(f"{directory}: no finished cell to report")
    cols = columns(task_table(cells))
    rows = [cell_row(cell, lines, cols) for cell, lines in cells]
    references = start_rows(cells, cols) + baseline_rows(run_summaries(directory), cols)
    groups = aggregate(rows + references, cols)
    write_csv(directory / "results.csv", groups, cols)
    with (directory / "cells.csv").open("w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    (directory / "results.md").write_text(markdown_table(groups, cols), encoding="utf-8")
    plot(directory / "plots", cells, groups, cols)
    return rows, groups, cols


def _label(cell: Mapping[str, Any]) -> str:
    setting = cell.get("setting")
    return str(cell.get("method")) + (f" [{setting}]" if setting and setting != "default" else "")


def _plot_name(scenario: str) -> str:
    """A plot's file name part for a scenario: its name, or a scenario file's stem (a path's
    slashes would name folders that do not exist)."""
    return Path(scenario).stem if scenario.endswith(".toml") else scenario


def _save(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure to `path` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(
    directory: Path,
    cells: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]],
    groups: Sequence[Aggregate],
    cols: Sequence[Column],
) -> list[Path]:
    """Per scenario: `curves-<scenario>.png` (each column's metric per round, one line per
    method, mean over seeds; references as dashed horizontal lines, the simple baselines as
    dotted ones; a subplot per task, titled
    with the device classes that run it) and `upload-<scenario>.png` (final metric vs upload MB,
    mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in dict.fromkeys(str(c.get("scenario")) for c, _ in cells):
        mine = [(c, lines) for c, lines in cells if str(c.get("scenario")) == scenario]
        classes = {}
        for c, _ in mine:
            for task, info in c.get("tasks", {}).items():
                classes.setdefault(task, info.get("classes", []))
        fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
        for ax, col in zip(axes[0], cols, strict=True):
            by_label: dict[str, dict[int, list[float]]] = {}
            for cell, lines in mine:
                if cell.get("kind") != "run":
                    final = value_at(max(lines, key=lambda e: e["round"]), col)
                    if final is not None:
                        by_label.setdefault(method_name(cell), {}).setdefault(-1, []).append(final)
                    continue
                for r, v in curve(lines, col):
                    by_label.setdefault(_label(cell), {}).setdefault(r, []).append(v)
            for label, points in by_label.items():
                if -1 in points:  # a reference: its final value as a level
                    level = sum(points[-1]) / len(points[-1])
                    ax.axhline(level, linestyle="--", linewidth=1, label=f"{label} (reference)", color="grey"
                               if label == "pretrained" else None)  # fmt: skip
                    continue
                rounds = sorted(points)
                ax.plot(rounds, [sum(points[r]) / len(points[r]) for r in rounds], "o-", ms=3, label=label)
            for g in groups:  # the simple baselines of this column, as dotted levels
                level = g.stats[col.name][0]
                if g.key["kind"] == "baseline" and g.key["scenario"] == scenario and level is not None:
                    ax.axhline(level, linestyle=":", linewidth=1, color="grey", label=str(g.key["method"]))
            where = "on devices" if col.on_devices else "server-side"
            ax.set_title(
                f"{col.task} ({', '.join(classes.get(col.task, [])) or col.task}): {where}", fontsize=9
            )
            ax.set_xlabel("round")
            ax.set_ylabel(f"held-out {col.metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        written.append(_save(fig, directory / f"curves-{_plot_name(scenario)}.png"))

        fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
        for ax, col in zip(axes[0], cols, strict=True):
            for g in groups:
                if g.key["scenario"] != scenario or g.key["kind"] != "run":
                    continue
                x, y = g.stats["upload MB"][0], g.stats[col.name][0]
                if x is not None and y is not None:
                    ax.plot([x], [y], "o")
                    label = str(g.key["method"])
                    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("upload MB (whole run)")
            ax.set_ylabel(f"final held-out {col.metric}")
            ax.set_title(f"{col.name}", fontsize=9)
            ax.grid(alpha=0.3)
        written.append(_save(fig, directory / f"upload-{_plot_name(scenario)}.png"))
    return written
