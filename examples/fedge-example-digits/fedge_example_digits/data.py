"""Handwritten digits from scikit-learn (on disk in the package: no download), split into writers.

The 1,797 8x8 digits have no writer ids, so the clients are a fixed, seeded label-skewed
partition (Dirichlet(1.0) over the classes per writer, the usual federated benchmark practice);
`N_WRITERS` clients, minus a `VENDOR_FRACTION` of the images kept out of every client as the
"vendor lab" set the shipped encoder was pretrained on. Within a client, the run's seed draws
the held-out quarter. The partition is part of the dataset's definition: it does not change
with the run's seed, so a client id always means the same images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from federation.data.common import split_indices, stable_seed
from federation.errors import FedgeError, MissingPackageError

N_CLASSES = 10
N_WRITERS = 30
VENDOR_FRACTION = 0.15
DIRICHLET_ALPHA = 1.0
TEST_FRACTION = 0.25
PARTITION_SEED = 20240601  # fixed: the partition is the dataset's, not the run's


@dataclass(frozen=True)
class DigitsClientData:
    """One writer's images: x float [n, 64] in [0, 1], y long [n] in 0..9."""

    client_id: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingPackageError("the digits dataset (scikit-learn)", "pip install scikit-learn") from None
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _partition() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(vendor-lab rows, {writer id: rows}), fixed."""
    _, y = _digits()
    rng = np.random.default_rng(PARTITION_SEED)
    order = rng.permutation(len(y))
    n_vendor = round(VENDOR_FRACTION * len(y))
    vendor, rest = np.sort(order[:n_vendor]), order[n_vendor:]
    rows: list[list[int]] = [[] for _ in range(N_WRITERS)]
    for label in range(N_CLASSES):
        members = rest[y[rest] == label]
        shares = rng.dirichlet(np.full(N_WRITERS, DIRICHLET_ALPHA))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for writer, part in enumerate(np.split(members, cuts)):
            rows[writer].extend(part.tolist())
    clients = {f"writer-{w:02d}": np.sort(np.asarray(r, dtype=np.int64)) for w, r in enumerate(rows)}
    return vendor, clients


def digits_clients() -> list[str]:
    """The writers, "writer-00" .. "writer-29"."""
    return sorted(_partition()[1])


def load_digits_client(client_id: str, seed: int) -> DigitsClientData:
    """A writer's images, a quarter held out (drawn from the run's seed and the writer)."""
    clients = _partition()[1]
    if client_id not in clients:
        last = f"writer-{N_WRITERS - 1:02d}"
        raise FedgeError(f"unknown digits client {client_id!r}: expected writer-00 .. {last}")
    x, y = _digits()
    rows = clients[client_id]
    train, test = split_indices(len(rows), TEST_FRACTION, stable_seed("digits", seed, client_id))
    return DigitsClientData(
        client_id,
        torch.from_numpy(x[rows[train]]),
        torch.from_numpy(y[rows[train]]),
        torch.from_numpy(x[rows[test]]),
        torch.from_numpy(y[rows[test]]),
    )


def vendor_lab() -> tuple[torch.Tensor, torch.Tensor]:
    """The images no writer holds, for pretraining the encoder."""
    x, y = _digits()
    rows = _partition()[0]
    return torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
