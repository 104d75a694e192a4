"""An exported adapter travels: it names its backbone by public id and loads with plain peft,
offline, with the script docs/adapters.md shows, in a process that cannot import fedge.

The run's real exporter (`server.report.export_adapters`) writes `adapter/`; the folder is
copied to a temporary directory (as onto another machine), and the documented script runs there
in a fresh interpreter whose working directory is that copy, not fedge's folder. Its next-token
logits must equal fedge's own phone model's on the same tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.config import RunConfig
from federation.model.backbones import MINILM_ID, minilm_dir
from federation.model.edge import build_task_model, task_slice

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "adapters.md"
FEDGE_PACKAGES = ("federation", "clients", "server", "simulations")

# Runs the documented script with every fedge package unimportable, then saves what it computed.
RUNNER = """
import importlib.abc, runpy, sys, torch

class NoFedge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ImportError(f"the adapter script imported fedge's {{name}}")
        return None

sys.meta_path.insert(0, NoFedge())
namespace = runpy.run_path("load_adapter.py")
torch.save({{"ids": namespace["ids"], "logits": namespace["logits"]}}, "outputs.pt")
"""


def documented_script() -> str:
    """The one python block of docs/adapters.md, verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, f"docs/adapters.md should show one python script, found {len(blocks)}"
    return blocks[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig, dict[str, np.ndarray]]:
    """adapter/ of a RunState whose phone state is non-zero (B and head), by the real exporter."""
    from server.loop import RunState
    from server.report import export_adapters

    run_dir = tmp_path_factory.mktemp("run")
    run = RunConfig.parse({"scenario": "smoke", "out-dir": str(run_dir)})
    fed = RunState(None, run)  # type: ignore[arg-type]
    gen = np.random.default_rng(7)
    for key, value in task_slice(fed.state, "phone").items():
        fed.state[f"phone/{key}"] = (0.1 * gen.standard_normal(value.shape)).astype(value.dtype)
    export_adapters(fed, run_dir / "adapter")
    return run_dir / "adapter", run, task_slice(fed.state, "phone")


def test_adapters_record_the_public_backbone_id_and_no_local_path(exported) -> None:
    adapter, _, _ = exported
    for task in ("phone", "tv"):
        config = json.loads((adapter / task / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == MINILM_ID
    # no file of the folder names a place on this machine (the venv's model folder, fedge's folder)
    local = (str(minilm_dir().resolve()), "site-packages", str(ROOT))
    for path in adapter.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md"}:
            text = path.read_text()
            assert not any(place in text for place in local), f"{path} names a local folder"


def test_documented_script_loads_the_adapter_elsewhere_without_fedge(exported, tmp_path: Path) -> None:
    adapter, run, phone_state = exported
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(adapter, elsewhere / "adapter")
    (elsewhere / "load_adapter.py").write_text(documented_script())
    (elsewhere / "runner.py").write_text(RUNNER.format(packages=FEDGE_PACKAGES))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    # -I: isolated mode, neither the working directory nor PYTHONPATH is on sys.path
    done = subprocess.run(
        [sys.executable, "-I", "runner.py"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "next word:" in done.stdout
    outputs = torch.load(elsewhere / "outputs.pt")

    model = build_task_model("phone", run.lora, run.seed)  # fedge's own model, same state
    model.load_shared_state(phone_state)
    model.eval()
    with torch.no_grad():
        expected = model(outputs["ids"])
        untouched = build_task_model("phone", run.lora, run.seed).eval()(outputs["ids"])
    assert (expected - untouched).abs().max() > 1e-2  # the adapter and head really matter
    torch.testing.assert_close(outputs["logits"], expected, atol=1e-4, rtol=1e-5)
