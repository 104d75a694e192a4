"""Every committed experiment file is runnable as committed: each cell's run config (scenario,
rule, settings) passes the checks a real `fedge experiment` makes before its first cell, so a
merge that adds a constraint to a rule (one rank, not a sum) cannot leave a file that stops at
start."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.cli import run_config_for, scenario_argument
from simulations.experiment import load_experiment, validate

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.toml"))


def _check(scenario: str, rounds: int | None, seed: int, cell_out: Path, sets: dict):  # type: ignore[no-untyped-def]
    return run_config_for(scenario_argument(scenario), rounds, seed, cell_out, sets)[1]


def test_the_experiments_folder_is_found() -> None:
    assert {p.name for p in EXPERIMENTS} >= {"smart-home-methods.toml", "smart-home-default.toml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_cell_of_a_committed_experiment_passes_the_checks(path: Path, tmp_path: Path) -> None:
    validate(load_experiment(path), tmp_path, _check)
