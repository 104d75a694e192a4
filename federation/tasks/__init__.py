"""The task registry: a task's name (as a device class names it in the catalogue) -> its `Task`.

Three places are looked in, in this order:
1. fedge's own tasks: phone, tv, sensor (one module each in this package);
2. tasks that installed packages declare in the entry-point group `fedge.tasks`
   (`[project.entry-points."fedge.tasks"] NAME = "package.module:TASK"`);
3. a reference `module:attribute` to a task object (or class) anywhere on the Python path.

So a task defined outside fedge runs with no edit inside it (docs/extending.md). A name found
nowhere is refused with the known names listed. A resolved task is also registered under its
own `info.name`, the key under which its state, metrics and outputs appear.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from federation.errors import FedgeError
from federation.tasks.base import Sums, Task, TaskInfo

__all__ = ["ENTRY_POINT_GROUP", "Sums", "Task", "TaskInfo", "get_task", "known_tasks", "resolved_tasks"]

ENTRY_POINT_GROUP = "fedge.tasks"
BUILTIN: dict[str, str] = {
    "phone": "federation.tasks.phone:TASK",
    "tv": "federation.tasks.tv:TASK",
    "sensor": "federation.tasks.sensor:TASK",
}
_resolved: dict[str, Task] = {}  # by reference and by info.name


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_tasks() -> list[str]:
    """Every task name that resolves without a `module:attribute`: built-in, then installed."""
    return [*BUILTIN, *(n for n in sorted(_entry_points()) if n not in BUILTIN)]


def resolved_tasks() -> dict[str, Task]:
    """The tasks this process has resolved so far, by name."""
    return {task.info.name: task for task in _resolved.values()}


def _load(reference: str, what: str) -> object:
    module_name, _, attribute = reference.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise FedgeError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FedgeError(f"{what}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _as_task(obj: object, what: str) -> Task:
    if isinstance(obj, type) and issubclass(obj, Task):
        obj = obj()
    if not isinstance(obj, Task):
        raise FedgeError(f"{what} is a {type(obj).__name__}, not a federation.tasks.Task")
    if not isinstance(getattr(obj, "info", None), TaskInfo):
        raise FedgeError(f"{what} has no TaskInfo `info`")
    return obj


def get_task(reference: str) -> Task:
    """The task a reference names: a known task name, or `module:attribute`."""
    task = _resolved.get(reference)
    if task is not None:
        return task
    if reference in BUILTIN:
        task = _as_task(_load(BUILTIN[reference], f"built-in task {reference!r}"), f"task {reference!r}")
    elif (ep := _entry_points().get(reference)) is not None:
        what = f"task {reference!r} (entry point {ep.value} in group {ENTRY_POINT_GROUP})"
        try:
            loaded = ep.load()
        except (ImportError, AttributeError) as exc:
            raise FedgeError(f"{what} does not load: {exc}") from None
        task = _as_task(loaded, what)
    elif ":" in reference and all(reference.partition(":")[::2]):
        task = _as_task(_load(reference, f"task {reference!r}"), f"task {reference!r}")
    else:
        raise FedgeError(
            f"unknown task {reference!r}: known tasks are {', '.join(known_tasks())}; a task defined "
            f"elsewhere is named as module:attribute or declared in the entry-point group {ENTRY_POINT_GROUP}"
        )
    name = task.info.name
    if ":" not in reference and name != reference:
        raise FedgeError(f"task {reference!r} declares the name {name!r}: a registered name must be its own")
    clash = _resolved.get(name)
    if clash is not None and clash is not task:
        raise FedgeError(f"task {reference!r} is named {name!r}, which another task already uses")
    if ":" in reference and name in known_tasks() and reference != BUILTIN.get(name):
        other = get_task(name)
        if other is not task:
            raise FedgeError(f"task {reference!r} is named {name!r}, which another task already uses")
    _resolved[reference] = _resolved[name] = task
    return task
