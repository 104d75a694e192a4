"""Where a ClientApp process's seconds go, one JSON line per exchange (for `fedge bench deploy`).

In a deployment Flower starts a fresh `flwr-clientapp` process for every message a SuperNode
receives (flwr 1.42, `--isolation subprocess`); what one exchange costs is then: the process's
start (interpreter, `import flwr`, pulling the message and the app bundle from the SuperNode),
importing the app, and the handler (its own imports, the run config, the device's data, its
model, training, secure aggregation's crypto). With the environment variable
`FEDGE_EXCHANGE_LOG=<file>` set (`fedge deploy up --exchange-log`), each handler appends to that
file: the seconds from the process's start to the app's import (`start`), from there to the
handler's entry (`app-import`), the named phases inside it, the handler's total, and which heavy
modules the process had loaded when it returned. Unset (the default), nothing is measured or
written. Standard library only: importing this module costs nothing a message does not pay.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

LOG_VAR = "FEDGE_EXCHANGE_LOG"
HEAVY_MODULES = ("torch", "transformers", "peft")  # what only training/evaluation may import
_APP_IMPORTED_AT = time.time()  # the app's first module: everything before it is Flower's

_phases: dict[str, float] = {}
Handler = TypeVar("Handler", bound=Callable[..., Any])


def enabled() -> bool:
    return bool(os.environ.get(LOG_VAR))


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the seconds spent in the block to the current exchange's phase `name`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _phases[name] = _phases.get(name, 0.0) + time.perf_counter() - start


def record(name: str, seconds: float) -> None:
    """Add `seconds` measured elsewhere (e.g. a task's own training loop) to phase `name`."""
    _phases[name] = _phases.get(name, 0.0) + seconds


def _process_started() -> float:
    """The process's start (wall clock): /proc's start time in clock ticks after boot."""
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    start_ticks = int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def _who(args: tuple[Any, ...]) -> dict[str, Any]:
    """The device (class-index, from its node config) and the server round of a handler's call."""
    who: dict[str, Any] = {}
    msg, context = (*args, None, None)[:2]
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
        node = context.node_config  # type: ignore[union-attr]
        who["device"] = f"{node.get('device-class', 'partition')}-{node.get('partition-id', '?')}"
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
        who["round"] = int(msg.content["config"]["server-round"])  # type: ignore[union-attr]
    return who


def timed(exchange: str) -> Callable[[Handler], Handler]:
    """Decorate a ClientApp handler: one JSON line per call to `$FEDGE_EXCHANGE_LOG` when set."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(*args: Any, **kwargs: Any) -> Any:
            path = os.environ.get(LOG_VAR)
            if not path:
                return handler(*args, **kwargs)
            entered = time.time()
            _phases.clear()
            ok = False
            try:
                reply = handler(*args, **kwargs)
                ok = True
                return reply
            finally:
                try:
                    started = _process_started()
                except (OSError, StopIteration, ValueError, IndexError):
                    started = _APP_IMPORTED_AT
                line = {
                    "exchange": exchange,
                    **_who(args),
                    "pid": os.getpid(),
                    "ok": ok,
                    "start": round(_APP_IMPORTED_AT - started, 3),
                    "app-import": round(entered - _APP_IMPORTED_AT, 3),
                    "handler": round(time.time() - entered, 3),
                    "phases": {k: round(v, 3) for k, v in _phases.items()},
                    "loaded": [m for m in HEAVY_MODULES if m in sys.modules],
                }
                with contextlib.suppress(OSError), open(path, "a") as out:
                    out.write(json.dumps(line) + "\n")

        return run  # type: ignore[return-value]

    return wrap


__all__ = ["HEAVY_MODULES", "LOG_VAR", "enabled", "phase", "record", "timed"]
