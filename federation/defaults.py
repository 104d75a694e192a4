"""The run defaults: read from `[tool.flwr.app.config]` of fedge's pyproject.toml, nowhere else.

That table is what users see and edit (and what Flower itself fuses `-c` overrides into), so it
is the one place a default is written. Code that needs a default outside a Flower run (a
`RunConfig` parsed from a partial mapping, a `TrainSettings()` in a test) reads it from here.
The file sits beside the `federation` package both in a source tree (`pip install -e .`) and in
the app folder Flower unpacks a run into.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any

from federation.errors import FedgeError

APP_DIR = Path(__file__).resolve().parent.parent  # the folder holding pyproject.toml
PYPROJECT = APP_DIR / "pyproject.toml"


@functools.lru_cache(maxsize=1)
def run_defaults() -> MappingProxyType[str, Any]:
    """`[tool.flwr.app.config]` of fedge's pyproject.toml, read once per process (read-only)."""
    try:
        table = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    except FileNotFoundError:
        raise FedgeError(
            f"fedge's run defaults live in [tool.flwr.app.config] of {PYPROJECT}, which is missing: "
            "install fedge from its source tree (pip install -e .)"
        ) from None
    except (KeyError, tomllib.TOMLDecodeError) as exc:
        raise FedgeError(f"{PYPROJECT} has no valid [tool.flwr.app.config] table ({exc})") from None
    return MappingProxyType(dict(table))


def run_default(key: str) -> Any:
    """One run default by its run-config key (e.g. `"lora-rank"`)."""
    return run_defaults()[key]
