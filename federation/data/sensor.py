"""Sensor: smartwatch exercise recognition from 50 Hz accelerometer + gyroscope windows.

Data: `seglearn.datasets.load_watch()` (BSD): 140 recordings of shoulder-rehabilitation
exercises, each [T, 6] (ax, ay, az, wx, wy, wz), 10 subjects x 7 exercises x both arms.

Subjects 1 and 2 play the device vendor's lab: their recordings never reach the fleet and serve
only to pretrain the compact IMU encoder and to fix the channel normalisation (a vendor ships
its firmware with constants measured in its lab, not on users' data). The fleet is subjects
3..10, each split into two clients by alternating recordings, giving 16 watches.

Held-out data are whole recordings: windows of one recording overlap and share one arm, one
session and one set of repetitions, so a window-level split would leak.

Every recording is read in the right wrist's frame (`to_right_wrist`): the dataset has both
arms, and a watch on the left wrist sees the mirror image of the same movement on the right.
A watch knows which wrist it is worn on (a setting every smartwatch asks for), so it maps its
own recordings before training or predicting; without it, abduction on one arm and forward
elevation on the other look alike, and the federated model swapped those two exercises from
round to round with the arms of the watches each round drew.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.data.common import package_dir, split_indices, stable_seed
from federation.errors import FedgeError

SENSOR_INSTALL = "pip install seglearn"
_WHAT = "the sensor dataset (package seglearn)"

VENDOR_LAB_SUBJECTS: tuple[int, ...] = (1, 2)
FLEET_SUBJECTS: tuple[int, ...] = tuple(range(3, 11))
WINDOW = 100  # 2 s at 50 Hz: one repetition of a slow exercise
STRIDE = 50
N_CLASSES = 7
N_CHANNELS = 6
# Pendulum, abduction, forward elevation, internal rotation, external rotation,
# trapezius extension, upright row (the dataset's own `y_labels`, in label order).
CLASS_NAMES: tuple[str, ...] = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
TEST_FRACTION = 0.25
# The dataset's `side`: 1 = right, 0 = left (seglearn's load_watch docstring).
RIGHT_WRIST = 1
# A left-wrist recording in the right wrist's frame: the mirror across the plane normal to the
# watch's x axis (along the forearm) flips the accelerometer's x, a vector, and the gyroscope's
# y and z, a pseudovector's components in the mirror plane. Measured: each exercise's mean ax
# over a recording has opposite signs on the two arms (pendulum +1.01 / -1.08 g-units, trapezius
# extension +1.02 / -1.04; ay and az agree), and the gyroscope's wy and wz mean signs flip
# with it while wx agrees. Checked as a whole: a 1D-CNN trained on every right-arm recording
# scores 0.857 on the left-arm recordings in this frame, 0.238 read raw, and 0.226-0.753 under
# the 14 other sign patterns of (ax, wx, wy, wz) (docs/results.md, "The watches' two wrists").
LEFT_TO_RIGHT = np.array([-1.0, 1.0, 1.0, 1.0, -1.0, -1.0], dtype=np.float32)
_CLIENT_ID = re.compile(r"^s(\d+)([ab])$")


@dataclass(frozen=True)
class SensorClientData:
    """One watch's windows: x float [n, N_CHANNELS, WINDOW] (normalised), y long [n] in 0..6."""

    client_id: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def sensor_clients() -> list[str]:
    """The 16 fleet clients "s3a", "s3b", ..., "s10b" (vendor-lab subjects are never clients)."""
    return [f"s{s}{half}" for s in FLEET_SUBJECTS for half in "ab"]


def load_sensor_client(client_id: str, seed: int) -> SensorClientData:
    """The client's windows, with 25% of its recordings (whole) held out, vendor-lab normalised."""
    train_rec, test_rec = _split_recordings(client_id, seed)
    train_x, train_y = _windows(train_rec)
    test_x, test_y = _windows(test_rec)
    return SensorClientData(client_id, train_x, train_y, test_x, test_y)


def load_vendor_lab() -> tuple[torch.Tensor, torch.Tensor]:
    """All normalised windows of the vendor-lab subjects, for pretraining the IMU encoder."""
    subjects = _watch()["subject"]
    return _windows(np.flatnonzero(np.isin(subjects, VENDOR_LAB_SUBJECTS)))


def normalisation() -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) over every vendor-lab sample: float32 [N_CHANNELS] each (copies)."""
    mean, std = _normalisation()
    return mean.copy(), std.copy()


def _client_recordings(client_id: str) -> np.ndarray:
    """Dataset indices of the client's recordings: its subject's recordings in dataset order,
    alternately assigned to half a and half b. Each half then holds 7 recordings with both arms
    and 5-6 of the 7 exercises, so a held-out recording can show an exercise its client never
    trained on: the non-IID label skew that federation has to bridge.
    """
    m = _CLIENT_ID.match(client_id)
    if m is None or int(m.group(1)) not in FLEET_SUBJECTS:
        raise FedgeError(
            f"unknown sensor client {client_id!r}: expected one of {', '.join(sensor_clients())}"
        )
    own = np.flatnonzero(_watch()["subject"] == int(m.group(1)))
    return own[0::2] if m.group(2) == "a" else own[1::2]


def _split_recordings(client_id: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) dataset indices of the client's recordings, split whole."""
    recordings = _client_recordings(client_id)
    train, test = split_indices(len(recordings), TEST_FRACTION, stable_seed("sensor", seed, client_id))
    return recordings[train], recordings[test]


def _windows(recordings: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised WINDOW-sample windows every STRIDE samples of each recording, with its label."""
    data = _watch()
    mean, std = _normalisation()
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for r in recordings.tolist():
        rec = (_recording(data, r) - mean) / std
        n = (len(rec) - WINDOW) // STRIDE + 1 if len(rec) >= WINDOW else 0
        if n == 0:
            continue
        starts = np.arange(n) * STRIDE
        xs.append(np.stack([rec[s : s + WINDOW].T for s in starts]))
        ys.append(np.full(n, int(data["y"][r]), dtype=np.int64))
    if not xs:
        return torch.zeros((0, N_CHANNELS, WINDOW)), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def to_right_wrist(recording: np.ndarray, side: int) -> np.ndarray:
    """A recording [T, 6] (ax, ay, az, wx, wy, wz) from the wrist `side` (1 right, 0 left) in
    the right wrist's frame, as float32 (a new array)."""
    if side not in (0, 1):
        raise ValueError(f"wrist side must be 0 (left) or 1 (right), got {side!r}")
    rec = np.array(recording, dtype=np.float32)
    if rec.ndim != 2 or rec.shape[1] != N_CHANNELS:
        raise ValueError(f"a recording is [samples, {N_CHANNELS}], got shape {rec.shape}")
    return rec if side == RIGHT_WRIST else rec * LEFT_TO_RIGHT


def _recording(data: dict[str, Any], r: int) -> np.ndarray:
    """Recording `r` of the dataset in the right wrist's frame."""
    return to_right_wrist(data["X"][r], int(data["side"][r]))


@functools.lru_cache(maxsize=1)
def _normalisation() -> tuple[np.ndarray, np.ndarray]:
    data = _watch()
    lab = [_recording(data, i) for i in np.flatnonzero(np.isin(data["subject"], VENDOR_LAB_SUBJECTS))]
    samples = np.concatenate(lab).astype(np.float64)
    std = samples.std(axis=0)
    std[std < 1e-8] = 1.0  # a dead channel would otherwise divide by zero
    return samples.mean(axis=0).astype(np.float32), std.astype(np.float32)


def _watch() -> dict[str, Any]:
    """The watch dataset; the package check is outside the memoised load so it always runs."""
    root = package_dir("seglearn", _WHAT, SENSOR_INSTALL)
    return _read_watch(str(root))


@functools.lru_cache(maxsize=1)
def _read_watch(root: str) -> dict[str, Any]:
    """Read the dataset file `load_watch()` reads, without importing seglearn and scikit-learn
    (seconds per client process); fall back to `load_watch()` if the file has moved."""
    path = Path(root) / "data" / "watch_dataset.npy"  # where seglearn.datasets.load_watch reads it
    if path.exists():
        # The same trusted file seglearn itself unpickles (it stores a dict of arrays).
        data = np.load(path, allow_pickle=True).item()
    else:
        from seglearn.datasets import load_watch

        data = load_watch()
    labels = tuple(str(x) for x in data["y_labels"])
    if labels != CLASS_NAMES or len(data["X"]) != 140 or data["X"][0].shape[1] != N_CHANNELS:
        raise FedgeError(
            f"seglearn's watch dataset is not the expected one (labels {labels}, {len(data['X'])} "
            f"recordings): run `{SENSOR_INSTALL}==1.2.5`"
        )
    data["subject"] = np.asarray(data["subject"]).astype(np.int64)
    data["y"] = np.asarray(data["y"]).astype(np.int64)
    data["side"] = np.asarray(data["side"]).astype(np.int64)
    return data
