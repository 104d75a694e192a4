"""The task registry and device classes as data: lookups, refusals, and plug-ins from outside fedge.

A task defined outside fedge is resolved two ways: named as `module:attribute` (here a module
written into a temporary folder on sys.path), and declared in the entry-point group
`fedge.tasks` (here a fabricated entry point, and the installed example package).
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from federation import tasks
from federation.config import RunConfig, unknown_setting_error
from federation.defaults import run_defaults
from federation.devices import builtin_catalogue, default_catalogue
from federation.errors import FedgeError
from federation.fleet import Device, device_for_partition
from federation.scenarios import Scenario, get_scenario, load_scenario_file
from federation.tasks import Task, get_task, known_tasks

ROOT = Path(__file__).resolve().parents[2]

# An outside task: a subclass of fedge's sensor task under its own name (a real, complete Task).
OUTSIDE_MODULE = """
from dataclasses import replace

from federation.tasks.sensor import SensorTask


class WristTask(SensorTask):
    info = replace(SensorTask.info, name="{name}", description="sensor, under another name")


TASK = WristTask()
"""

TIER = """
compute_gflops = 3.0
memory_mb = 96
lora_rank = 4
batch_size = 16
downlink_mbps = 8.0
uplink_mbps = 4.0
energy_j_per_step = 0.08
dropout_prob = 0.05
"""


def _scenario_file(tmp_path: Path, device_class: str, task: str, name: str = "plugin-check") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        textwrap.dedent(f"""
        [scenario]
        name = "{name}"
        description = "a class added by a scenario file"
        fleet = {{ "{device_class}/only" = 3 }}
        per_round = {{ {device_class} = 3 }}
        rounds = 1
        local_steps = {{ {device_class} = 2 }}
        device_clock = false

        [devices.{device_class}]
        task = "{task}"
        needs_charging = false
        needs_idle = false
        needs_unmetered = false
        diurnal = [{", ".join(["1.0"] * 24)}]

        [devices.{device_class}.tiers.only]
        """)
        + TIER
    )
    return path


@pytest.fixture(autouse=True)
def registries_restored(restored_registries: Any) -> Iterator[None]:
    """Classes, scenarios and tasks these tests add stay in these tests (process-wide registries)."""
    with restored_registries():
        yield


@pytest.fixture
def outside_module(tmp_path: Path) -> Iterator[str]:
    """A module `fedge_outside_<id>` defining TASK (named like the module), importable for the test."""
    name = f"fedge_outside_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(OUTSIDE_MODULE.format(name=name.replace("_", "-")))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield name
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


# -- built-in tasks and refusals -----------------------------------------------------------


def test_builtin_tasks_are_found_by_name_and_declare_what_fedge_needs() -> None:
    assert known_tasks()[:3] == ["phone", "tv", "sensor"]
    for name in ("phone", "tv", "sensor"):
        task = get_task(name)
        assert isinstance(task, Task) and task.info.name == name
        assert task.info.primary_metric in task.info.metrics and task.info.flops_per_example > 0
    assert get_task("tv").info.personalised and not get_task("phone").info.personalised


def test_an_unknown_task_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(FedgeError) as info:
        get_task("sensr")
    message = str(info.value)
    assert "unknown task 'sensr'" in message
    for name in ("phone", "tv", "sensor"):
        assert name in message
    assert "module:attribute" in message and "\n" not in message


def test_a_class_running_an_unknown_task_fails_at_config_parse(tmp_path: Path) -> None:
    path = _scenario_file(tmp_path, "gadget", "no-such-task")
    with pytest.raises(FedgeError, match=r"unknown task 'no-such-task': known tasks are phone, tv, sensor"):
        RunConfig.parse({"scenario": str(path)})


def test_a_bad_module_reference_is_refused_clearly() -> None:
    with pytest.raises(FedgeError, match="cannot import module 'no_such_module_here'"):
        get_task("no_such_module_here:TASK")
    with pytest.raises(FedgeError, match="has no attribute 'NOPE'"):
        get_task("federation.tasks.phone:NOPE")
    with pytest.raises(FedgeError, match=r"not a federation\.tasks\.Task"):
        get_task("federation.tasks.phone:TaskInfo")


# -- tasks from outside fedge ----------------------------------------------------------------


def test_a_task_named_module_attribute_runs_with_no_edit_inside_fedge(
    tmp_path: Path, outside_module: str
) -> None:
    reference = f"{outside_module}:TASK"
    path = _scenario_file(tmp_path, "wristband", reference)
    run = RunConfig.parse({"scenario": str(path)})
    name = outside_module.replace("_", "-")
    assert run.scenario.tasks == (name,)
    device = device_for_partition(run.scenario, 0, run.seed)
    assert device.device_class == "wristband" and device.task == name and device.rank == 4
    assert get_task(name) is get_task(reference)  # registered under its own name too


def test_a_task_declared_as_an_entry_point_is_found(
    monkeypatch: pytest.MonkeyPatch, outside_module: str
) -> None:
    name = outside_module.replace("_", "-")
    declared = {name: EntryPoint(name=name, value=f"{outside_module}:TASK", group=tasks.ENTRY_POINT_GROUP)}
    monkeypatch.setattr(tasks, "_entry_points", lambda: declared)
    assert name in known_tasks()
    assert get_task(name).info.name == name


def test_an_entry_point_under_another_name_than_its_task_is_refused(
    monkeypatch: pytest.MonkeyPatch, outside_module: str
) -> None:
    alias = EntryPoint(name="alias", value=f"{outside_module}:TASK", group=tasks.ENTRY_POINT_GROUP)
    declared = {"alias": alias}
    monkeypatch.setattr(tasks, "_entry_points", lambda: declared)
    with pytest.raises(FedgeError, match="declares the name"):
        get_task("alias")


def test_two_outside_tasks_may_not_share_a_name(tmp_path: Path) -> None:
    modules = [f"fedge_twin_{i}_{abs(hash(tmp_path)) % 10**8}" for i in (1, 2)]
    for module in modules:
        (tmp_path / f"{module}.py").write_text(OUTSIDE_MODULE.format(name="twin-task"))
    sys.path.insert(0, str(tmp_path))
    try:
        assert get_task(f"{modules[0]}:TASK").info.name == "twin-task"
        with pytest.raises(FedgeError, match="named 'twin-task', which another task already uses"):
            get_task(f"{modules[1]}:TASK")
    finally:
        sys.path.remove(str(tmp_path))
        for module in modules:
            sys.modules.pop(module, None)


def test_an_outside_task_may_not_take_a_builtin_name(tmp_path: Path) -> None:
    name = f"fedge_clash_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(OUTSIDE_MODULE.format(name="phone"))
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(FedgeError, match="named 'phone', which another task already uses"):
            get_task(f"{name}:TASK")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


# -- device classes as data ------------------------------------------------------------------


def test_a_new_class_running_the_phone_task_is_a_toml_change(tmp_path: Path) -> None:
    path = _scenario_file(tmp_path, "tablet", "phone", name="tablets")
    run = RunConfig.parse({"scenario": str(path)})
    assert run.scenario.tasks == ("phone",)
    assert run.scenario.tiers == {"tablet/only": 3}
    devices = [device_for_partition(run.scenario, p, 0) for p in range(3)]
    assert {d.task for d in devices} == {"phone"} and {d.device_class for d in devices} == {"tablet"}
    assert default_catalogue()[("tablet", "only")].task == "phone"


def test_the_shipped_catalogue_says_which_task_each_class_runs() -> None:
    tasks_of = {cls: profile.task for (cls, _), profile in builtin_catalogue().items()}
    assert tasks_of == {"phone": "phone", "tv": "tv", "sensor": "sensor"}


def test_unknown_classes_and_redefinitions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match=r"unknown device class 'toaster': use one of phone, sensor, tv"):
        Device("toaster", "x")
    with pytest.raises(FedgeError, match=r"unknown device class in `toaster/low`: use one of phone, sensor"):
        Scenario("toasters", "", {"toaster/low": 1}, {"toaster": 1}, 1, {"toaster": 1})
    clash = _scenario_file(tmp_path, "phone", "tv", name="clash")  # the built-in phone, redefined
    with pytest.raises(FedgeError, match="already has"):
        load_scenario_file(clash)
    with pytest.raises(FedgeError, match="unknown scenario 'smart-hom'"):
        get_scenario("smart-hom")


@pytest.mark.parametrize(
    ("line", "replacement", "words"),
    [
        ("rounds = 1", 'rounds = "one"', "`rounds` must be a number >= 0"),
        ("rounds = 1", "rounds = 1\ncolour = 'red'", "unknown key `colour` in [scenario]"),
        ("device_clock = false", "device_clock = 0", "`device_clock` must be true or false"),
        ('name = "bad"', "", "missing 1 required positional argument: 'name'"),
        ("rounds = 1", "rounds = 1\nhead_lr = { watch = 0.001 }", "head_lr names `watch`, not a class"),
        ("rounds = 1", "rounds = 1\nhead_lr = { slate = 0 }", "head_lr of `slate` must be a number > 0"),
        ("rounds = 1", "rounds = 1\nhead_lr = 0.001", "`head_lr` must be a table"),
        (
            "rounds = 1",
            "rounds = 1\noptimizer = { slate = 'adam' }",
            "optimizer of `slate` must be one of adamw, sgd",
        ),
        ("rounds = 1", "rounds = 1\nlr = { slate = -1 }", "lr of `slate` must be a number > 0"),
        (
            "rounds = 1",
            "rounds = 1\nlocal_epochs = { slate = 0 }",
            "local_epochs of `slate` must be a number > 0",
        ),
        ("rounds = 1", "rounds = 1\nlocal_epochs = { tv = 1 }", "local_epochs names `tv`, not a class"),
        ("rounds = 1", "rounds = 1\nlocal_epochs = 0.5", "`local_epochs` must be a table"),
    ],
)
def test_a_malformed_scenario_file_is_refused_naming_the_key(
    tmp_path: Path, line: str, replacement: str, words: str
) -> None:
    text = _scenario_file(tmp_path, "slate", "phone", name="bad").read_text()
    assert line in text
    (tmp_path / "bad.toml").write_text(text.replace(line, replacement, 1))
    with pytest.raises(FedgeError) as info:
        load_scenario_file(tmp_path / "bad.toml")
    assert words in str(info.value) and "bad.toml" in str(info.value)


def test_a_scenario_file_sets_a_class_its_own_optimizer_and_learning_rates(tmp_path: Path) -> None:
    text = _scenario_file(tmp_path, "slate", "phone", name="slates").read_text()
    own = "optimizer = { slate = 'sgd' }\nlr = { slate = 2 }\nhead_lr = { slate = 0.0005 }"
    (tmp_path / "slates.toml").write_text(text.replace("rounds = 1", "rounds = 1\n" + own))
    run = RunConfig.parse({"scenario": str(tmp_path / "slates.toml"), "head-lr": 0.002})
    slate = run.train_for("slate")
    assert (slate.optimizer, slate.lr, slate.head_lr) == ("sgd", 2.0, pytest.approx(0.0005))
    # what a class the scenario does not name gets: the run's
    assert (run.train.optimizer, run.train.head_lr) == ("adamw", pytest.approx(0.002))


def test_a_class_must_name_its_task_at_class_level(tmp_path: Path) -> None:
    text = _scenario_file(tmp_path, "kiosk", "phone", name="kiosk").read_text()
    (tmp_path / "no-task.toml").write_text(text.replace('task = "phone"\n', "", 1))
    with pytest.raises(FedgeError, match="must name the task it runs"):
        load_scenario_file(tmp_path / "no-task.toml")
    tier_task = text.replace("[devices.kiosk.tiers.only]\n", '[devices.kiosk.tiers.only]\ntask = "tv"\n')
    (tmp_path / "tier-task.toml").write_text(tier_task)
    with pytest.raises(FedgeError, match="`task` belongs to the class"):
        load_scenario_file(tmp_path / "tier-task.toml")


def test_no_code_compares_against_a_task_or_class_name() -> None:
    """Task and class names live in the task modules and the catalogue; elsewhere they are looked up."""
    comparison = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](phone|tv|sensor)["']""")
    offenders = []
    for folder in ("federation", "server", "clients", "simulations"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.parent.name == "tasks":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if comparison.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


# -- run settings ------------------------------------------------------------------------------


def test_an_unknown_setting_is_refused_naming_the_closest_ones() -> None:
    with pytest.raises(FedgeError, match=r"no setting 'lora-rnak': did you mean lora-rank"):
        RunConfig.parse({"lora-rnak": 4})
    message = unknown_setting_error(["zzz"], ["seed", "lr"])
    assert message is not None and "known settings: lr, seed" in message
    assert unknown_setting_error(["seed"], ["seed", "lr"]) is None


def test_code_defaults_are_read_from_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    """One place for each default: change it in the table and every consumer follows."""
    from federation import config, defaults
    from federation.model.lora import LoraSettings
    from federation.training import TrainSettings

    changed = {**run_defaults(), "batch-size": 7, "lora-rank": 4, "lr": 0.5, "seed": 11}
    monkeypatch.setattr(defaults, "run_defaults", lambda: changed)
    monkeypatch.setattr(config, "run_defaults", lambda: changed)
    assert TrainSettings(steps=1).batch_size == 7 and TrainSettings(steps=1).lr == 0.5
    assert LoraSettings().rank == 4
    run = RunConfig.parse({})
    assert (run.train.batch_size, run.lora.rank, run.seed) == (7, 4, 11)
