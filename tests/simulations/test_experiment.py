"""`fedge experiment`: bad experiment files are refused with a clear message, unknown rules are
refused before anything runs, a finished cell is skipped and an interrupted one rerun (real
reference cells on a 3-watch scenario: no Flower), and `fedge report` rebuilds the table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from federation.errors import FedgeError
from federation.references import task_devices, task_examples
from simulations.cli import run_config_for
from simulations.experiment import load_experiment, parse_experiment, run_experiment, run_reference, select
from simulations.report import DONE_FILE, build_report

GOOD = """
[experiment]
name = "t"
scenarios = ["smoke"]
seeds = [0, 1]
references = ["centralized"]
set = { federated-eval-every = 2 }
[methods]
exact-mixed-rank = {}
plain = { aggregation = "exact-mixed-rank", set = { secure-aggregation = false } }
"""


def _check(scenario: str, rounds: int | None, seed: int, out: Path, sets: dict[str, Any]) -> Any:
    return run_config_for(scenario, rounds, seed, out, sets)[1]


def test_grid_is_methods_by_scenarios_by_seeds_plus_references() -> None:
    experiment = parse_experiment(GOOD)
    cells = experiment.cells
    assert [(c.kind, c.method, c.seed) for c in cells] == [
        ("run", "exact-mixed-rank", 0),
        ("run", "plain", 0),
        ("centralized", "centralized", 0),
        ("run", "exact-mixed-rank", 1),
        ("run", "plain", 1),
        ("centralized", "centralized", 1),
    ]
    plain = cells[1]
    assert plain.sets == {
        "federated-eval-every": 2,
        "secure-aggregation": False,
        "aggregation": "exact-mixed-rank",
    }
    assert "aggregation" not in cells[2].sets  # a reference has no rule
    assert len({c.key for c in cells}) == len(cells) and len({c.id for c in cells}) == len(cells)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[experiment\nname='x'", "is not valid TOML"),
        ("[methods]\na = {}", "[experiment] must be a table"),
        ("[experiment]\nscenarios=['smoke']\nseeds=[0]\n[methods]\na={}", "needs a `name`"),
        ("[experiment]\nname='x'\nseeds=[0]\n[methods]\na={}", "scenarios must be a non-empty list"),
        ("[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[]\n[methods]\na={}", "seeds must be"),
        ("[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0, 0]\n[methods]\na={}", "seeds must be"),
        ("[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[-1]\n[methods]\na={}", "seeds must be"),
        (
            "[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\nrounds=-2\n[methods]\na={}",
            "rounds must be",
        ),
        (
            "[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\nseed=[1]\n[methods]\na={}",
            "unknown key `seed`",
        ),
        ("[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]", "nothing to run"),
        (
            "[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\nreferences=['oracle']",
            "unknown reference",
        ),
        ("[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\n[method]\na={}", "unknown table [method]"),
        (
            "[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\n[methods]\na={rule='b'}",
            "unknown key `rule`",
        ),
        (
            "[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\n[methods]\na={set={aggregation='b'}}",
            "give the rule as `aggregation`",
        ),
        (
            "[experiment]\nname='x'\nscenarios=['smoke']\nseeds=[0]\n[methods]\na={}\nb={aggregation='a'}",
            "have the same settings",
        ),
    ],
)
def test_bad_experiment_files_are_refused_with_a_clear_message(text: str, says: str) -> None:
    with pytest.raises(FedgeError) as caught:
        parse_experiment(text, "bad.toml")
    assert says in str(caught.value) and "bad.toml" in str(caught.value)


def test_missing_experiment_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")


def test_unknown_rule_or_setting_is_refused_before_any_cell_runs(tmp_path: Path) -> None:
    calls: list[Any] = []
    text = GOOD + 'later = { aggregation = "no-such-rule" }\n'
    with pytest.raises(FedgeError) as caught:
        run_experiment(parse_experiment(text), tmp_path / "x", _check, lambda *a, **k: calls.append(a))
    message = str(caught.value)
    assert "method 'later'" in message and "no-such-rule" in message and "exact-mixed-rank" in message
    assert calls == [] and not (tmp_path / "x").exists()  # nothing ran, nothing was written

    text = GOOD + "typo = { set = { learning-rate = 0.1 } }\n"
    with pytest.raises(FedgeError, match=r"method 'typo'.*learning-rate"):
        run_experiment(parse_experiment(text), tmp_path / "y", _check, lambda *a, **k: calls.append(a))
    assert calls == []


ON_RUNS = """
[experiment]
name = "on-runs"
scenarios = ["smoke"]
seeds = [0]
rounds = 2
references = ["pretrained", "centralized", "local-only"]
examples-of = "exact-mixed-rank"
[methods]
exact-mixed-rank = {}
"""


def test_examples_of_ties_each_trained_reference_to_its_seeds_run_cell() -> None:
    cells = parse_experiment(ON_RUNS.replace("seeds = [0]", "seeds = [0, 1]")).cells
    runs = {c.seed: c for c in cells if c.kind == "run"}
    for cell in cells:
        if cell.kind in ("centralized", "local-only"):
            assert cell.examples_of == runs[cell.seed]  # its own seed's run, not another's
        else:
            assert cell.examples_of is None  # the start trains nothing; a run is its own basis
    planned = parse_experiment(ON_RUNS.replace('examples-of = "exact-mixed-rank"\n', "")).cells
    # on the plan or on a run's examples: different references, different cells (resume-safe)
    assert {c.key for c in planned if c.kind == "centralized"}.isdisjoint(
        {c.key for c in cells if c.kind == "centralized"}
    )


@pytest.mark.parametrize(
    ("replace", "says"),
    [
        (('"exact-mixed-rank"\n[', '"fedit"\n['), "examples-of must name one of its [methods]"),
        (('"exact-mixed-rank"\n[', "3\n["), "examples-of must name one of its [methods]"),
        (('"pretrained", "centralized", "local-only"', '"pretrained"'), "no trained reference"),
    ],
)
def test_bad_examples_of_is_refused(replace: tuple[str, str], says: str) -> None:
    with pytest.raises(FedgeError, match=re.escape(says)):
        parse_experiment(ON_RUNS.replace(*replace), "on-runs.toml")


def _fake_run(participants: list[dict[str, int]]) -> Any:
    """A stand-in for `fedge simulate` (no Flower) that leaves a finished run's metrics.jsonl
    whose rounds aggregated `participants`; the references it feeds are real."""

    def simulate(scenario: str, rounds: int | None, seed: int, out: Path, sets: dict, quiet: bool) -> Path:
        lines = [{"round": 0, "eval": {}}] + [
            {"round": r, "eval": {}, "participants": p} for r, p in enumerate(participants, start=1)
        ]
        (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
        return out

    return simulate


def test_references_train_on_the_named_runs_examples_and_follow_a_rerun(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    given: list[tuple[str, Any]] = []

    def reference_runner(cell: Any, run: Any, cell_dir: Path, device_rounds: Any) -> None:
        given.append((cell.kind, device_rounds))
        (cell_dir / "metrics.jsonl").write_text(json.dumps({"round": 2, "eval": {}}) + "\n")

    experiment = parse_experiment(ON_RUNS)
    # smoke plans 2 phones a round: the night let 1 of them train in round 2
    night = [{"phone": 2}, {"phone": 1}]
    run_experiment(experiment, out, _check, _fake_run(night), say=lambda _: None,
                   reference_runner=reference_runner)  # fmt: skip
    assert given == [("pretrained", None), ("centralized", {"phone": 3}), ("local-only", {"phone": 3})]
    central = next(c for c in experiment.cells if c.kind == "centralized")
    record = json.loads((out / "cells" / central.id / "cell.json").read_text())
    assert record["examples_of"] == "exact-mixed-rank"
    # the report names the basis: a plan's reference and a run's are not the same row
    assert "centralized (examples of exact-mixed-rank)" in (out / "results.md").read_text()

    # unchanged: everything skipped
    given.clear()
    run_experiment(experiment, out, _check, _fake_run(night), say=lambda _: None,
                   reference_runner=reference_runner)  # fmt: skip
    assert given == []
    # the run cell is rerun (interrupted) and this time trains other examples: its trained
    # references follow it; the pretrained start does not depend on it
    run_dir = out / "cells" / next(c for c in experiment.cells if c.kind == "run").id
    (run_dir / DONE_FILE).unlink()
    run_experiment(experiment, out, _check, _fake_run([{"phone": 2}, {"phone": 2}]), say=lambda _: None,
                   reference_runner=reference_runner)  # fmt: skip
    assert given == [("centralized", {"phone": 4}), ("local-only", {"phone": 4})]


def test_a_reference_whose_run_has_not_finished_is_refused_by_name(tmp_path: Path) -> None:
    experiment = select(parse_experiment(ON_RUNS), None, ["centralized"])
    with pytest.raises(FedgeError, match=r"examples of method 'exact-mixed-rank'.*has not finished"):
        run_experiment(experiment, tmp_path / "exp", _check, _fake_run([]), say=lambda _: None)


def test_the_real_reference_trains_on_the_runs_examples(tmp_path: Path) -> None:
    """`run_reference` itself: the centralized watch model trains for the run's 5 device-rounds
    of the plan's 20 (a quarter of the examples), and reference.json says on whose examples."""
    text = ON_RUNS.replace('"smoke"', '"dropout-check"').replace('"pretrained", ', "")
    experiment = parse_experiment(text)
    central = next(c for c in experiment.cells if c.kind == "centralized")
    run = _check(central.scenario, 2, 0, tmp_path, dict(central.sets))
    planned = sum(task_examples(run, "sensor", task_devices(run, "sensor")).values())
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    run_reference(central, run, cell_dir, {"sensor": 5})
    detail = json.loads((cell_dir / "reference.json").read_text())
    assert detail["examples_of"] == experiment.cells[0].id
    assert detail["device_rounds"] == {"sensor": 5}
    trained = detail["tasks"]["sensor"]["examples"]
    assert planned / 4 <= trained < planned / 4 + run.train.batch_size  # whole steps of the batch
    line = json.loads((cell_dir / "metrics.jsonl").read_text())
    assert line["round"] == 2 and line["eval"]["sensor"]["accuracy"] >= 0.0


TINY = """
[experiment]
name = "tiny"
scenarios = ["deploy-check"]
seeds = [0]
references = ["pretrained", "local-only"]
"""


def test_finished_cells_are_skipped_and_interrupted_ones_rerun(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    said: list[str] = []
    experiment = parse_experiment(TINY)
    never = lambda *a, **k: pytest.fail("no federated cell in this experiment")  # noqa: E731
    run_experiment(experiment, out, _check, never, say=said.append)
    pretrained_dir, local_dir = (out / "cells" / c.id for c in experiment.cells)
    assert len([s for s in said if s.startswith("[")]) == 2 and "skipped" not in " ".join(said)
    first = json.loads((local_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert first["round"] == 1 and first["federated"]["sensor"]["accuracy"] >= 0.0
    assert (out / "results.md").is_file() and (out / "results.csv").is_file()

    # the local-only cell is interrupted (no done.json); the pretrained one finished
    (local_dir / DONE_FILE).unlink()
    (local_dir / "leftover").write_text("from the interrupted attempt")
    metrics_mtime = (pretrained_dir / "metrics.jsonl").stat().st_mtime_ns
    said.clear()
    run_experiment(experiment, out, _check, never, say=said.append)
    assert said[0].startswith("[1/2] pretrained") and said[0].endswith("done before, skipped")
    assert said[1].startswith("[2/2] local-only") and "rerun: interrupted before" in said[1]
    assert (pretrained_dir / "metrics.jsonl").stat().st_mtime_ns == metrics_mtime
    assert not (local_dir / "leftover").exists() and (local_dir / DONE_FILE).is_file()
    again = json.loads((local_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert again["federated"] == first["federated"]  # seeded: the rerun trains alike


def _cell(
    root: Path,
    name: str,
    method: str,
    seed: int,
    lines: list[dict[str, Any]],
    kind: str = "run",
    scenario: str = "s",
) -> None:
    cell_dir = root / "cells" / name
    cell_dir.mkdir(parents=True)
    tasks = {
        "phone": {"metric": "top1", "personalised": False, "classes": ["phone"]},
        "tv": {"metric": "auc", "personalised": True, "classes": ["tv"]},
    }
    record = {
        "id": name,
        "kind": kind,
        "method": method,
        "scenario": scenario,
        "setting": "default",
        "seed": seed,
        "order": len(list((root / "cells").iterdir())),
        "tasks": tasks,
    }
    (cell_dir / "cell.json").write_text(json.dumps(record))
    (cell_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (cell_dir / DONE_FILE).write_text("{}")


def _run_lines(phone: float, tv_server: float, tv_devices: float, upload: int, eps: float | None) -> list:
    start = {
        "round": 0,
        "eval": {"phone": {"top1": 0.0}, "tv": {"auc": 0.5}},
        "federated": {"tv": {"auc": 0.6}},
    }
    middle: dict[str, Any] = {
        "round": 1,
        "eval": {"phone": {"top1": 0.05}, "tv": {"auc": 0.52}},
        "federated": {},
        "upload_bytes": upload,
        "clock": {"sim_time_s": 7200.0, "simulated_s": 30.0},
    }
    end: dict[str, Any] = {
        "round": 2,
        "eval": {"phone": {"top1": phone}, "tv": {"auc": tv_server}},
        "federated": {"phone": {"top1": 0.9}, "tv": {"auc": tv_devices}},
        "upload_bytes": upload,
        "clock": {"sim_time_s": 7530.0, "simulated_s": 30.0},
    }
    if eps is not None:
        middle["privacy"] = {"epsilon": eps / 2, "delta": 1e-5}
        end["privacy"] = {"epsilon": eps, "delta": 1e-5}
    return [start, middle, end]


def test_report_table_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    _cell(tmp_path, "a0", "rule-a", 0, _run_lines(0.10, 0.55, 0.70, 1_000_000, None))
    _cell(tmp_path, "a1", "rule-a", 1, _run_lines(0.20, 0.65, 0.60, 3_000_000, None))
    _cell(tmp_path, "a2", "rule-a", 2, _run_lines(0.30, 0.60, 0.65, 2_000_000, None))
    local = [
        {"round": 0, "federated": {"phone": {"top1": 0.0}, "tv": {"auc": 0.6}}},
        {"round": 2, "federated": {"phone": {"top1": 0.07}, "tv": {"auc": 0.58}}},
    ]
    _cell(tmp_path, "l0", "local-only", 0, local, kind="local-only")
    unfinished = tmp_path / "cells" / "b0"
    _cell(tmp_path, "b0", "rule-b", 0, _run_lines(0.9, 0.9, 0.9, 1, None))
    (unfinished / DONE_FILE).unlink()  # interrupted: not reported

    _, groups, cols = build_report(tmp_path)
    assert [c.name for c in cols] == ["phone top1", "tv auc", "tv auc (on devices)"]
    assert [g.key["method"] for g in groups] == ["rule-a", "local-only", "pretrained start"]
    a = groups[0]
    mean, std, n = a.stats["phone top1"]  # server-side at the last line, not the on-device 0.9
    assert n == 3 and mean == pytest.approx(0.2) and std == pytest.approx(0.1)  # sample std (n - 1)
    assert a.stats["tv auc"][:2] == pytest.approx((0.6, 0.05))
    assert a.stats["tv auc (on devices)"][:2] == pytest.approx((0.65, 0.05))
    assert a.stats["upload MB"][:2] == pytest.approx((4.0, 2.0))  # summed over the run's lines
    assert a.stats["simulated h"][0] == pytest.approx((7560.0 - 7200.0) / 3600.0)
    local_group = groups[1]
    assert local_group.stats["phone top1"][:3] == pytest.approx((0.07, 0.0, 1))  # on devices: no server model
    assert local_group.stats["upload MB"][0] == 0.0

    md = (tmp_path / "results.md").read_text()
    assert "| rule-a | run | s | default | 3 | 0.200 ± 0.100 | 0.600 ± 0.050 | 0.650 ± 0.050 |" in md
    assert "epsilon" not in md and "rule-b" not in md
    csv_text = (tmp_path / "results.csv").read_text()
    assert "phone top1 mean" in csv_text and "0.2," in csv_text
    assert (tmp_path / "plots" / "curves-s.png").is_file() and (tmp_path / "plots" / "upload-s.png").is_file()


def test_a_scenario_files_plots_are_named_by_its_stem(tmp_path: Path) -> None:
    # an experiment over a scenario file (`scenarios = ["experiments/scenarios/watches.toml"]`):
    # its path's folders are no part of a plot's file name
    lines = _run_lines(0.10, 0.55, 0.70, 1_000_000, None)
    _cell(tmp_path, "a0", "rule-a", 0, lines, scenario="dir/sub/w.toml")
    build_report(tmp_path)
    assert (tmp_path / "plots" / "curves-w.png").is_file() and (tmp_path / "plots" / "upload-w.png").is_file()


def test_report_carries_the_pretrained_start_and_the_runs_simple_baselines(tmp_path: Path) -> None:
    _cell(tmp_path, "a0", "rule-a", 0, _run_lines(0.10, 0.55, 0.70, 1_000_000, None))
    _cell(tmp_path, "b0", "rule-b", 0, _run_lines(0.20, 0.56, 0.71, 1_000_000, None))
    _cell(tmp_path, "a1", "rule-a", 1, _run_lines(0.30, 0.60, 0.65, 2_000_000, None))
    later = _run_lines(0.4, 0.6, 0.6, 1, None)[1:]  # a run whose round 0 is not in its file
    _cell(tmp_path, "c2", "rule-c", 2, later)
    for name, seed, bigram in (("a0", 0, 0.15), ("b0", 0, 0.99), ("a1", 1, 0.17), ("c2", 2, 0.5)):
        summary = {
            "seed": seed,
            "tasks": {
                "phone": {"device_baselines": [], "baselines": {"bigram": {"top1": bigram, "top3": 0.3}}},
                "tv": {
                    "device_baselines": ["user-mean"],
                    "baselines": {"item-bias": {"auc": 0.54}, "user-mean": {"auc": 0.61 + seed / 100}},
                },
            },
        }
        (tmp_path / "cells" / name / "summary.json").write_text(json.dumps(summary))

    _, groups, _ = build_report(tmp_path)
    by_method = {g.key["method"]: g for g in groups}
    start = by_method["pretrained start"]  # round 0 of seeds 0 and 1; rule-c's file has no round 0
    assert start.key["kind"] == "start" and start.seeds == [0, 1]
    assert start.stats["phone top1"][:3] == pytest.approx((0.0, 0.0, 2))
    assert start.stats["tv auc"][0] == pytest.approx(0.5)
    assert start.stats["tv auc (on devices)"][0] == pytest.approx(0.6)
    bigram = by_method["baseline: bigram"]  # the first run of each seed: b0's 0.99 is not counted twice
    assert bigram.seeds == [0, 1, 2]
    assert bigram.stats["phone top1"][0] == pytest.approx((0.15 + 0.17 + 0.5) / 3)
    assert bigram.stats["tv auc"][0] is None
    user_mean = by_method["baseline: user-mean"]  # computed on the devices: the on-device column
    assert user_mean.stats["tv auc"][0] is None
    assert user_mean.stats["tv auc (on devices)"][0] == pytest.approx(0.62)
    assert by_method["baseline: item-bias"].stats["tv auc"][0] == pytest.approx(0.54)
    assert by_method["baseline: item-bias"].stats["tv auc (on devices)"][0] is None
    md = (tmp_path / "results.md").read_text()
    assert "| pretrained start | start | s | - | 2 | 0.000 ± 0.000 | 0.500 ± 0.000 | 0.600 ± 0.000 |" in md
    assert "| baseline: user-mean | baseline | s | - | 3 | - | - | 0.620 ± 0.010 | - | - |" in md
    cells_csv = (tmp_path / "cells.csv").read_text()
    assert "baseline" not in cells_csv and "pretrained" not in cells_csv  # cells.csv: the cells only


def test_report_refuses_a_damaged_summary(tmp_path: Path) -> None:
    _cell(tmp_path, "a0", "rule-a", 0, _run_lines(0.10, 0.55, 0.70, 1, None))
    (tmp_path / "cells" / "a0" / "summary.json").write_text("{not json")
    with pytest.raises(FedgeError, match=r"a0/summary.json is damaged"):
        build_report(tmp_path)


def test_report_shows_epsilon_when_runs_carry_it(tmp_path: Path) -> None:
    _cell(tmp_path, "d0", "dp", 0, _run_lines(0.1, 0.5, 0.6, 10, 2.0))
    _cell(tmp_path, "d1", "dp", 1, _run_lines(0.1, 0.5, 0.6, 10, 4.0))
    _, groups, _ = build_report(tmp_path)
    assert groups[0].stats["epsilon"][:2] == pytest.approx((3.0, 2**0.5))  # the last line's, cumulative
    md = (tmp_path / "results.md").read_text()
    assert "epsilon" in md.splitlines()[0] and "3.00 ± 1.41" in md


def test_report_refuses_a_folder_without_cells(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match="not an experiment folder"):
        build_report(tmp_path)
