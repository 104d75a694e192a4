"""What a deployed exchange imports and loads, each in a fresh Python process, as Flower 1.42's
SuperNode runs every message in a fresh `flwr-clientapp` process (docs/deployment.md, "Where an
exchange's seconds go").

- The secure-aggregation steps that neither train nor evaluate (mask, check, unmask) run through
  the real ClientApp with numpy and `cryptography` only: torch, transformers and peft (seconds
  to import, per process) stay out, and the round they serve still unmasks to the right sum.
- A watch's data loads from the dataset file itself, without importing seglearn and
  scikit-learn (seconds per process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from federation.secagg.pki import create_fleet_pki
from simulations.runner import APP_DIR

CHILD = Path(__file__).with_name("secure_steps_child.py")


def _run(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=str(APP_DIR), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_mask_check_and_unmask_exchanges_import_no_torch_and_still_unmask_the_sum(tmp_path: Path) -> None:
    pki_dir = create_fleet_pki(tmp_path / "pki", [f"sensor-{i}" for i in range(3)])
    result = json.loads(_run([str(CHILD), str(pki_dir)]))
    assert result["loaded-before"] == [], "loading the ClientApp itself imported " + str(result)
    assert result["loaded-after"] == [], "a non-training exchange imported " + str(result["loaded-after"])
    assert result["sum-correct"] and result["survivors"] == 3, result


def test_a_watch_loads_its_data_without_importing_seglearn() -> None:
    code = (
        "import sys, json\n"
        "from federation.data.sensor import load_sensor_client, sensor_clients\n"
        "data = load_sensor_client(sensor_clients()[0], 0)\n"
        "print(json.dumps({'windows': len(data.train_x), "
        "'imported': [m for m in ('seglearn', 'sklearn') if m in sys.modules]}))\n"
    )
    result = json.loads(_run(["-c", code]))
    assert result["windows"] > 0
    assert result["imported"] == [], f"loading a watch's data imported {result['imported']}"
