"""The run's status file, `status.json` in its output folder: where the server stands before its
first round and why it stopped, for whoever watches the run (docs/metrics.md).

Rounds themselves are reported by `metrics.jsonl`; this file covers what happens outside them
(waiting for devices, check-in, a run that failed) so that a front end (`fedge simulate`'s
progress bar and its error message) reads one documented JSON object rather than the server's
log text, whose wording is free to change.

The file is replaced atomically (written beside it, then renamed), so a reader never sees half of
it. Pure file I/O: no Flower.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"

# Stages, in the order a run goes through them (its rounds, between checked-in and done, are
# metrics.jsonl's); `failed` can follow any of them.
WAITING = "waiting-for-devices"
CHECKED_IN = "checked-in"
DONE = "done"
FAILED = "failed"
STAGES = (WAITING, CHECKED_IN, DONE, FAILED)


def write_status(out: Path, stage: str, **fields: Any) -> None:
    """Replace `out/status.json` with `{"stage": stage, **fields}` (fields must be JSON values)."""
    if stage not in STAGES:
        raise ValueError(f"unknown run stage {stage!r}; stages: {', '.join(STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / STATUS_FILE
    scratch = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
    scratch.write_text(json.dumps({"stage": stage, **fields}) + "\n")
    os.replace(scratch, path)


def read_status(out: Path) -> dict[str, Any] | None:
    """The run's last status, or None when there is none yet (or it is not a status object)."""
    try:
        status = json.loads((out / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("stage") not in STAGES:
        return None
    return status


def out_dir_of(run_config: Mapping[str, Any]) -> Path | None:
    """The output folder a raw run config names (`out-dir`), or None: used where the config could
    not be parsed, so that even a refused run leaves its reason beside its (empty) metrics."""
    out = run_config.get("out-dir")
    return Path(out) if isinstance(out, str) and out else None
