"""Which sign map puts a left-wrist recording in the right wrist's frame? Print the figures.

Trains the IMU encoder's architecture from scratch (15 epochs, seed 0, one thread) on every
right-arm recording of seglearn's watch data, then scores it on the left-arm recordings read
with each of the 16 sign patterns of (ax, wx, wy, wz) (ay and az agree across arms). The
pattern `federation.data.sensor.LEFT_TO_RIGHT` uses should score far above the rest
(docs/results.md, "The watches' two wrists"). About a minute on one core.

    .venv/bin/python scripts/wrist_frame_check.py
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from federation.data.sensor import LEFT_TO_RIGHT, RIGHT_WRIST, STRIDE, WINDOW, _watch
from federation.model.imu import FEATURES, IMUEncoder


def windows(recordings: np.ndarray, sign: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    data = _watch()
    xs, ys = [], []
    for r in recordings.tolist():
        rec = np.asarray(data["X"][r], dtype=np.float32) * sign
        for k in range(max((len(rec) - WINDOW) // STRIDE + 1, 0)):
            xs.append(rec[k * STRIDE : k * STRIDE + WINDOW].T)
            ys.append(int(data["y"][r]))
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def pattern_accuracies() -> dict[tuple[int, int, int, int], float]:
    """Left-arm accuracy of a model trained on the right arm, per (ax, wx, wy, wz) sign pattern."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        side = _watch()["side"]
        right, left = np.flatnonzero(side == RIGHT_WRIST), np.flatnonzero(side != RIGHT_WRIST)
        x, y = windows(right, np.ones(6, dtype=np.float32))
        mean, std = x.mean((0, 2), keepdim=True), x.std((0, 2), keepdim=True)
        encoder, head = IMUEncoder(), nn.Linear(FEATURES, 7)
        opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(15):
            for batch in torch.randperm(len(x), generator=gen).split(32):
                loss = nn.functional.cross_entropy(head(encoder((x[batch] - mean) / std)), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        encoder.eval()
        out = {}
        for ax, wx, wy, wz in itertools.product((1, -1), repeat=4):
            xl, yl = windows(left, np.array([ax, 1, 1, wx, wy, wz], dtype=np.float32))
            with torch.no_grad():
                predicted = head(encoder((xl - mean) / std)).argmax(-1)
            out[(ax, wx, wy, wz)] = (predicted == yl).float().mean().item()
        return out
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    shipped = tuple(int(LEFT_TO_RIGHT[i]) for i in (0, 3, 4, 5))
    for (ax, wx, wy, wz), accuracy in pattern_accuracies().items():
        mark = "  <- LEFT_TO_RIGHT" if (ax, wx, wy, wz) == shipped else ""
        print(f"ax {ax:+d} wx {wx:+d} wy {wy:+d} wz {wz:+d}: left-arm accuracy {accuracy:.3f}{mark}")


if __name__ == "__main__":
    main()
