"""The full global state as Flower's legacy ordered parameter list (all tasks, sorted keys)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from federation.config import RunConfig
from federation.model.edge import initial_state


def run_config(cfg: Mapping[str, Any]) -> RunConfig:
    return RunConfig.parse(
        {"scenario": cfg["scenario"], "seed": cfg["seed"], "num-rounds": cfg["num-rounds"]}
    )


def global_keys_and_state(run: RunConfig) -> tuple[list[str], dict[str, np.ndarray]]:
    state = initial_state(run.scenario.tasks, run.lora, run.seed, run)
    return sorted(state), state
