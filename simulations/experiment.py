"""`fedge experiment FILE.toml`: a grid of federated runs and references, resumable, then a report.

An experiment file:

```toml
[experiment]
name = "smart-home-methods"          # the default output folder: results/experiments/<name>
description = "..."
scenarios = ["smart-home"]           # named scenarios or scenario files
seeds = [0, 1, 2]
rounds = 6                           # optional (0 or absent: each scenario's own)
references = ["centralized", "local-only"]   # optional: pretrained, centralized, local-only
examples-of = "exact-mixed-rank"     # optional: trained references see that method's examples
set = { federated-eval-every = 3 }   # optional: run settings of every cell (as `--set`)

[methods]                            # name -> its aggregation rule and settings
exact-mixed-rank = {}                # no `aggregation`: the name is the rule
"exact-mixed-rank+fedadam" = { aggregation = "exact-mixed-rank", set = { server-optimizer = "fedadam" } }

[settings]                           # optional: named setting variants, crossed with everything
default = {}
slow = { lr = 0.001 }
```

The grid is methods x scenarios x settings x seeds (each cell a `fedge simulate` run with the
method's and the setting's `--set` overrides) plus references x scenarios x settings x seeds
(each cell a `federation.references` reference). A trained reference (centralized, local-only)
trains on the scenario's planned examples, or, with `examples-of = METHOD`, on the examples that
method's run cell of the same scenario, setting and seed aggregated (the device-rounds its
metrics.jsonl records per task, as `fedge reference --examples-of`): where the simulated night
lets fewer devices train than a round asks for, the plan overstates what the run trained. Every
cell's run config is parsed before any
cell runs, so an unknown rule or setting, a bad value or an unknown scenario is refused at
start, naming the method and the fix.

A cell is identified by its settings (`Cell.key`: kind, scenario, seed, rounds, every
override): its folder `cells/<id>` holds `cell.json` and, once it finished, `done.json`. A rerun
of the experiment skips finished cells and reruns, from scratch, a cell whose folder has no
`done.json` (interrupted). One progress line per cell; at the end results.csv, cells.csv,
results.md and plots/ (`simulations.report`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.errors import FedgeError
from simulations.report import CELL_FILE, DONE_FILE, METRICS_FILE, build_report, read_metrics, value_at

REFERENCE_KINDS = ("pretrained", "centralized", "local-only")
EXPERIMENT_KEYS = {"name", "description", "scenarios", "seeds", "rounds", "references", "set", "examples-of"}
TRAINED_REFERENCES = ("centralized", "local-only")  # the kinds that train, on examples a run may set
METHOD_KEYS = {"aggregation", "set"}


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a federated run (`kind = "run"`) or a reference."""

    kind: str  # "run" or a reference kind
    method: str  # the method's name (a reference: its kind)
    scenario: str
    setting: str
    seed: int
    rounds: int  # 0: the scenario's
    sets: dict[str, Any] = field(default_factory=dict)  # every run-setting override of the cell
    order: int = 0
    # a trained reference on the examples of this run cell (its `Cell`); None: on the plan
    examples_of: Cell | None = None

    @property
    def key(self) -> str:
        """What identifies the cell: its kind, scenario, seed, rounds and settings (not its name),
        and for a reference on a run's examples, that run cell's key."""
        ident = {"kind": self.kind, "scenario": self.scenario, "seed": self.seed, "rounds": self.rounds,
                 "sets": self.sets}  # fmt: skip
        if self.examples_of is not None:
            ident["examples_of"] = self.examples_of.key
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def id(self) -> str:
        name = f"{self.method}-{Path(self.scenario).stem}-{self.setting}-s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) + "-" + self.key[:8]


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    cells: tuple[Cell, ...]


def _fail(where: str, message: str) -> FedgeError:
    return FedgeError(f"experiment {where}: {message}")


def _table(where: str, value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"{what} must be a table, got {value!r}")
    return value


def _str_list(where: str, value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(where, f"{what} must be a non-empty list of strings, got {value!r}")
    return value


def parse_experiment(text: str, where: str = "<text>") -> Experiment:
    """An experiment from TOML text: refuses a malformed file with one line naming the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(where, f"is not valid TOML ({exc})") from None
    unknown = sorted(set(raw) - {"experiment", "methods", "settings"})
    if unknown:
        raise _fail(where, f"unknown table [{unknown[0]}] (known: [experiment], [methods], [settings])")
    head = _table(where, raw.get("experiment"), "[experiment]")
    extra = sorted(set(head) - EXPERIMENT_KEYS)
    if extra:
        raise _fail(
            where, f"unknown key `{extra[0]}` in [experiment] (known: {', '.join(sorted(EXPERIMENT_KEYS))})"
        )
    name = head.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, "[experiment] needs a `name` (a non-empty string)")
    scenarios = _str_list(where, head.get("scenarios"), "[experiment] scenarios")
    seeds = head.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise _fail(
            where, f"[experiment] seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}"
        )
    rounds = head.get("rounds", 0)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise _fail(where, f"[experiment] rounds must be an integer >= 0, got {rounds!r}")
    references = head.get("references", [])
    if references:
        references = _str_list(where, references, "[experiment] references")
    for kind in references:
        if kind not in REFERENCE_KINDS:
            raise _fail(where, f"unknown reference {kind!r}: use {', '.join(REFERENCE_KINDS)}")
    common = _table(where, head.get("set", {}), "[experiment] set")
    methods = _table(where, raw.get("methods", {}), "[methods]")
    if not methods and not references:
        raise _fail(where, "names no [methods] and no references: nothing to run")
    examples_of = head.get("examples-of")
    if examples_of is not None:
        if not isinstance(examples_of, str) or examples_of not in methods:
            raise _fail(
                where, f"[experiment] examples-of must name one of its [methods], got {examples_of!r}"
            )
        if not set(references) & set(TRAINED_REFERENCES):
            raise _fail(
                where, f"[experiment] examples-of {examples_of!r}: no trained reference to give them "
                f"(references: {', '.join(TRAINED_REFERENCES)})",
            )  # fmt: skip
    parsed_methods: dict[str, dict[str, Any]] = {}
    for method, spec in methods.items():
        spec = _table(where, spec, f"[methods] {method}")
        bad = sorted(set(spec) - METHOD_KEYS)
        if bad:
            raise _fail(where, f"method {method!r}: unknown key `{bad[0]}` (known: aggregation, set)")
        aggregation = spec.get("aggregation", method)
        if not isinstance(aggregation, str) or not aggregation:
            raise _fail(where, f"method {method!r}: aggregation must be a rule name, got {aggregation!r}")
        sets = _table(where, spec.get("set", {}), f"[methods] {method} set")
        if "aggregation" in sets:
            raise _fail(where, f"method {method!r}: give the rule as `aggregation`, not in `set`")
        parsed_methods[method] = {**sets, "aggregation": aggregation}
    settings = _table(where, raw.get("settings", {"default": {}}), "[settings]") or {"default": {}}
    for setting, sets in settings.items():
        _table(where, sets, f"[settings] {setting}")
    cells: list[Cell] = []
    for scenario in scenarios:
        for setting, setting_sets in settings.items():
            for seed in seeds:
                runs = {}
                for method, method_sets in parsed_methods.items():
                    sets = {**common, **setting_sets, **method_sets}
                    runs[method] = Cell("run", method, scenario, setting, seed, rounds, sets, len(cells))
                    cells.append(runs[method])
                for kind in references:
                    sets = {**common, **setting_sets}
                    basis = (
                        runs[examples_of] if examples_of is not None and kind in TRAINED_REFERENCES else None
                    )
                    cells.append(Cell(kind, kind, scenario, setting, seed, rounds, sets, len(cells), basis))
    keys = {}
    for cell in cells:
        if cell.key in keys:
            raise _fail(where, f"cells {keys[cell.key]!r} and {cell.id!r} have the same settings")
        keys[cell.key] = cell.id
    return Experiment(name.strip(), str(head.get("description", "")), tuple(cells))


def load_experiment(path: Path) -> Experiment:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedgeError(f"experiment file {path} does not exist") from None
    except UnicodeDecodeError:
        raise _fail(str(path), "is not UTF-8 text") from None
    return parse_experiment(text, str(path))


def select(experiment: Experiment, seeds: list[int] | None, methods: list[str] | None) -> Experiment:
    """The cells of some seeds and some methods (a reduced run); references stay unless
    `methods` names none of them."""
    cells = list(experiment.cells)
    if seeds:
        missing = sorted(set(seeds) - {c.seed for c in cells})
        if missing:
            raise FedgeError(f"--seeds {missing}: not a seed of experiment {experiment.name!r}")
        cells = [c for c in cells if c.seed in seeds]
    if methods:
        missing = sorted(set(methods) - {c.method for c in cells})
        if missing:
            raise FedgeError(
                f"--methods {missing}: experiment {experiment.name!r} has "
                f"{', '.join(dict.fromkeys(c.method for c in experiment.cells))}"
            )
        cells = [c for c in cells if c.method in methods]
    return Experiment(experiment.name, experiment.description, tuple(cells))


# -- running ----------------------------------------------------------------------------------

# (scenario, rounds, seed, out, sets) -> the run config, validated (the CLI's `run_config_for`)
Validate = Callable[[str, int | None, int, Path, dict[str, Any]], Any]
# (scenario, rounds, seed, out, sets) -> out, having left a run's outputs there (`simulate_scenario`)
Simulate = Callable[..., Path]


def validate(experiment: Experiment, out: Path, check: Validate) -> dict[str, Any]:
    """Every cell's run config, parsed before anything runs: {cell id: RunConfig}. The first
    bad cell stops the experiment with one line naming the cell, its method and the problem."""
    configs = {}
    for cell in experiment.cells:
        try:
            configs[cell.id] = check(cell.scenario, cell.rounds or None, cell.seed, out / "cells" / cell.id,
                                     dict(cell.sets))  # fmt: skip
        except FedgeError as exc:
            what = f"method {cell.method!r}" if cell.kind == "run" else f"reference {cell.kind!r}"
            setting = f", setting {cell.setting!r}" if cell.setting != "default" else ""
            raise FedgeError(
                f"experiment {experiment.name!r}, {what}{setting}, {cell.scenario}: {exc}"
            ) from None
    return configs


def task_info(run: Any) -> dict[str, dict[str, Any]]:
    """The run's tasks for the report: primary metric, personalised, the classes that run it."""
    from federation.tasks import get_task

    out = {}
    for task in run.scenario.tasks:
        info = get_task(task).info
        classes = [c for c in run.scenario.fleet if run.scenario.class_task(c) == task]
        out[task] = {"metric": info.primary_metric, "personalised": info.personalised, "classes": classes}
    return out


def run_reference(cell: Cell, run: Any, out: Path, device_rounds: Mapping[str, int] | None = None) -> None:
    """A reference cell, in a run's metrics.jsonl format: the pretrained start as round 0 (a
    `pretrained` cell), or the reference after training as the run's last round (the start is
    the federated runs' round 0, the same model on the same data), plus reference.json. With
    `device_rounds` (per task, of the run cell `cell.examples_of`), trained on that run's examples."""
    from federation.references import reference, reference_entries

    refs = reference(run, cell.kind, device_rounds=device_rounds)
    start, end = reference_entries(refs, refs, run.rounds)
    lines = [start] if cell.kind == "pretrained" else [end]
    (out / METRICS_FILE).write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    detail = {r.task: {"examples": r.examples, "steps": r.steps, "seconds": r.seconds} for r in refs}
    basis = {}
    if cell.examples_of is not None:
        basis = {"examples_of": cell.examples_of.id, "device_rounds": dict(device_rounds or {})}
    (out / "reference.json").write_text(json.dumps({"kind": cell.kind, "tasks": detail, **basis}, indent=2))


def run_device_rounds(cell: Cell, out: Path, rounds: int) -> dict[str, int] | None:
    """The device-rounds per task of the run cell a reference trains for (None: the plan); that
    cell must have finished in this experiment's folder."""
    from federation.references import read_trained_device_rounds

    if cell.examples_of is None:
        return None
    source = out / "cells" / cell.examples_of.id
    if not (source / DONE_FILE).is_file():
        raise FedgeError(
            f"reference {cell.kind!r} seed {cell.seed} trains on the examples of method "
            f"{cell.examples_of.method!r}, whose run cell {cell.examples_of.id} has not finished: "
            "run that method first (it runs before its references unless --methods leaves it out)"
        )
    return read_trained_device_rounds(source, rounds)


def summary_line(cell: Cell, lines: list[dict[str, Any]], tasks: Mapping[str, Mapping[str, Any]]) -> str:
    from simulations.report import columns

    if not lines:
        return "no metrics"
    last = max(lines, key=lambda e: e["round"])
    parts = []
    for col in columns(tasks):
        value = value_at(last, col)
        if value is not None:
            parts.append(f"{col.name} {value:.3f}")
    return ", ".join(parts)


def run_experiment(
    experiment: Experiment,
    out: Path,
    check: Validate,
    simulate: Simulate,
    say: Callable[[str], None] = print,
    reference_runner: Callable[[Cell, Any, Path, Mapping[str, int] | None], None] = run_reference,
) -> Path:
    """Run every cell not yet finished (validated first, all of them), then write the report."""
    configs = validate(experiment, out, check)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(
        json.dumps(
            {
                "name": experiment.name,
                "description": experiment.description,
                "cells": [c.id for c in experiment.cells],
            },
            indent=2,
        )
    )
    total = len(experiment.cells)
    for i, cell in enumerate(experiment.cells, start=1):
        cell_dir = out / "cells" / cell.id
        label = f"[{i}/{total}] {cell.method} {Path(cell.scenario).stem} {cell.setting} seed {cell.seed}"
        done = cell_dir / DONE_FILE
        run = configs[cell.id]
        # a reference on a run's examples: what that run (finished before it) trained, now
        trained = None if cell.kind == "run" else run_device_rounds(cell, out, run.rounds)
        if done.is_file():
            try:
                record = json.loads(done.read_text())
                # ... and the run it was trained for has not been rerun since with other examples
                finished = record.get("key") == cell.key and record.get("device_rounds") == trained
            except (ValueError, AttributeError):
                finished = False
            if finished and (cell_dir / METRICS_FILE).is_file():
                say(f"{label}: done before, skipped")
                continue
        rerun = cell_dir.exists()
        if rerun:
            shutil.rmtree(cell_dir)  # an interrupted cell starts again from scratch
        cell_dir.mkdir(parents=True)
        record = {"id": cell.id, "key": cell.key, "kind": cell.kind, "method": cell.method,
                  "scenario": cell.scenario, "setting": cell.setting, "seed": cell.seed, "rounds": run.rounds,
                  "sets": cell.sets, "order": cell.order, "tasks": task_info(run)}  # fmt: skip
        if cell.examples_of is not None:  # the report labels the reference with the method
            record["examples_of"] = cell.examples_of.method
            record["examples_of_cell"] = cell.examples_of.id
        (cell_dir / CELL_FILE).write_text(json.dumps(record, indent=2, default=str))
        started = time.monotonic()
        if cell.kind == "run":
            simulate(cell.scenario, cell.rounds or None, cell.seed, cell_dir, dict(cell.sets), quiet=True)
        else:
            reference_runner(cell, run, cell_dir, trained)
        seconds = time.monotonic() - started
        finished_record = {"key": cell.key, "seconds": seconds}
        if trained is not None:
            finished_record["device_rounds"] = trained
        (cell_dir / DONE_FILE).write_text(json.dumps(finished_record))
        lines = read_metrics(cell_dir / METRICS_FILE)
        again = " (rerun: interrupted before)" if rerun else ""
        say(f"{label}: {summary_line(cell, lines, record['tasks'])} ({seconds:.0f} s){again}")
    build_report(out)
    say(f"results in {out}: results.md, results.csv, cells.csv, plots/")
    return out
