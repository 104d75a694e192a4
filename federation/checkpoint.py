"""Checkpoints of the global shared state: safetensors for arrays, JSON for the rest.

Written atomically (temp file + rename), so a crash mid-write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import FedgeError


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def split_prefixed(
    checkpoint: Mapping[str, np.ndarray], prefix: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A checkpoint's arrays as (those without `prefix`, those with it, the prefix removed): how
    the global state and the server's own arrays (optimizer moments, served average) share a file."""
    rest = {k: v for k, v in checkpoint.items() if not k.startswith(prefix)}
    part = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    return rest, part


def save_checkpoint(directory: Path, state: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> Path:
    """Write `checkpoint.safetensors` + `checkpoint.json`; returns the safetensors path."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    path = directory / "checkpoint.safetensors"
    _atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"fedge": json.dumps(dict(info))}))
    _atomic_write(
        directory / "checkpoint.json", lambda tmp: Path(tmp).write_text(json.dumps(dict(info), indent=2))
    )
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint; a missing or damaged file is a one-line FedgeError."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise FedgeError(f"checkpoint {path} does not exist: pass a checkpoint.safetensors written by fedge")
    try:
        with safe_open(str(path), framework="numpy") as f:
            info = json.loads((f.metadata() or {}).get("fedge", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises several types for damaged files
        raise FedgeError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}): use another checkpoint or start fresh"
        ) from None
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        raise FedgeError(f"checkpoint {path} holds NaN/inf in {bad[0]}: use an earlier checkpoint")
    return state, info


def completed_rounds(metrics_path: Path, last_round: int, why: str = "cannot resume") -> list[dict[str, Any]]:
    """The metrics entries of rounds 0..last_round from a run's metrics.jsonl, in order, each
    once (a later line for a round replaces an earlier one); missing file: none. A line that is
    not an entry is refused, the error ending with `why`."""
    if not metrics_path.is_file():
        return []
    entries: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            round_ = int(entry["round"])
        except (ValueError, KeyError, TypeError):
            raise FedgeError(f"{metrics_path} line {number} is not a metrics entry: {why}") from None
        if round_ <= last_round:
            entries[round_] = entry
    return [entries[r] for r in sorted(entries)]


def write_metrics(metrics_path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `entries`, atomically."""
    text = "".join(json.dumps(e) + "\n" for e in entries)
    _atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(text))
