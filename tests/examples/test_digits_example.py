"""The worked example of docs/extending.md: a task, a device class and a scenario from a package
outside fedge (examples/fedge-example-digits), installed the way the docs say
(`pip install -e examples/fedge-example-digits`, done by scripts/install.sh), run through
Flower's simulation engine with secure aggregation, its held-out accuracy improving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib.metadata import distribution, entry_points
from pathlib import Path
from typing import Any

import pytest

from federation.config import RunConfig
from simulations.cli import simulate_scenario

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fedge-example-digits"


def test_the_example_is_installed_from_examples_and_declares_its_plugins() -> None:
    dist = distribution("fedge-example-digits")
    tasks = {ep.name: ep.value for ep in entry_points(group="fedge.tasks")}
    scenarios = {ep.name: ep.value for ep in entry_points(group="fedge.scenarios")}
    assert tasks.get("digits") == "fedge_example_digits.task:TASK"
    assert scenarios.get("digits-notepads") == "fedge_example_digits:SCENARIO_FILE"
    import fedge_example_digits

    # an editable install of this repository's example, not a copy from elsewhere
    assert Path(fedge_example_digits.__file__).resolve().is_relative_to(EXAMPLE), dist.locate_file("")
    run = RunConfig.parse({"scenario": "digits-notepads"})
    assert run.scenario.tasks == ("digits",) and set(run.scenario.fleet) == {"notepad"}


@pytest.fixture(scope="module", autouse=True)
def registries_restored(restored_registries: Any) -> Iterator[None]:
    """The notepad class and the digits task this module loads stay in this module."""
    with restored_registries():
        yield


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_scenario("digits-notepads", None, 0, tmp_path_factory.mktemp("digits"), {}, quiet=True)


def test_the_example_task_runs_through_flower_with_secure_aggregation(digits_run: Path) -> None:
    rounds = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for entry in rounds[1:]:
        assert entry.get("secure") is True and entry["participants"] == {"notepad": 6}, entry
        assert entry["failures"] == 0 and entry["rejected"] == 0 and not entry["aborted"]
    accuracy = [r["eval"]["digits"]["accuracy"] for r in rounds]
    loss = [r["eval"]["digits"]["loss"] for r in rounds]
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy  # measured: 0.26 -> 0.83
    assert loss[-1] < loss[0], loss
    summary = json.loads((digits_run / "summary.json").read_text())
    digits = summary["tasks"]["digits"]
    assert digits["metric"] == "accuracy" and digits["final"] > digits["initial"]
    assert set(digits["baselines"]) == {"majority", "nearest-centroid"}
    assert digits["final_on_devices"]["examples"] == digits["final_metrics"]["examples"]  # same held-out data
    assert (digits_run / "adapter" / "digits" / "adapter_config.json").is_file()
