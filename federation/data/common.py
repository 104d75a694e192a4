"""Helpers shared by the dataset modules: the on-disk cache and seeded splits."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.errors import FedgeError, MissingPackageError


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where preprocessed data lives: `override`, else $FEDGE_CACHE, else ~/.cache/fedge."""
    raw = override or os.environ.get("FEDGE_CACHE") or Path.home() / ".cache" / "fedge"
    path = Path(raw).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, what: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingPackageError(what, install)
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return Path(spec.origin).parent


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file then rename: concurrent processes never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from the parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffle-split of range(n) into (train, test); test gets >= 1 when n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    n_test = min(max(n_test, 1), n - 1) if n >= 2 else 0
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def pool(data: Sequence[Any], client_id: str = "pooled") -> Any:
    """One client holding every client's examples: each tensor field of the task's data
    dataclass concatenated along its rows (train with train, held-out with held-out)."""
    if not data:
        raise ValueError("nothing to pool")
    first = data[0]
    if not dataclasses.is_dataclass(first):
        raise FedgeError(f"cannot pool a {type(first).__name__}: a task's client data must be a dataclass")
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        value = getattr(first, f.name)
        if isinstance(value, torch.Tensor):
            fields[f.name] = torch.cat([getattr(d, f.name) for d in data])
        elif isinstance(value, np.ndarray):
            fields[f.name] = np.concatenate([getattr(d, f.name) for d in data])
        elif isinstance(value, str):
            fields[f.name] = client_id
        else:
            fields[f.name] = value
    return type(first)(**fields)
