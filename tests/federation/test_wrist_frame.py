"""The sign map that reads a left-wrist recording in the right wrist's frame is the right one:
a model trained on every right-arm recording scores the left-arm recordings read through
`LEFT_TO_RIGHT` far better than read raw or through any other of the 16 sign patterns of
(ax, wx, wy, wz) (`scripts/wrist_frame_check.py`, ~15 s)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from federation.data.sensor import LEFT_TO_RIGHT

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "wrist_frame_check.py"


def test_the_shipped_mirror_is_the_sign_map_the_left_arm_follows() -> None:
    spec = importlib.util.spec_from_file_location("wrist_frame_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracies = module.pattern_accuracies()
    shipped = tuple(int(LEFT_TO_RIGHT[i]) for i in (0, 3, 4, 5))
    assert LEFT_TO_RIGHT[1] == LEFT_TO_RIGHT[2] == 1.0  # ay and az agree across arms
    best = max(accuracies, key=accuracies.__getitem__)
    others = max(a for pattern, a in accuracies.items() if pattern != shipped)
    assert best == shipped, accuracies
    assert accuracies[shipped] > others + 0.05 and accuracies[shipped] > accuracies[(1, 1, 1, 1)] + 0.4
