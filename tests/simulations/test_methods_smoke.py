"""Every research method of docs/methods.md, one round through Flower's simulation engine.

The `dropout-check` fleet (10 watches of ranks 2 and 4, all every round; the sensor task alone,
so the run is short), one round per method: the run finishes with every device in the
aggregate and none rejected, and the rule's own mark is in the checkpoint (FLoRA's and
FedEx-LoRA's residuals moved, FedSA-LoRA's global B still zero while A moved, FLoRA's B back at
zero). A sum rule runs with secure aggregation (the default), the others plain; a one-rank rule
with `uniform-rank = 2`. FedSA-LoRA (a secure round, device-kept B, shared A) is in the default
suite; the others are `slow` (about a minute each on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.checkpoint import load_checkpoint
from federation.rules.server_opt import split_server_opt
from federation.served_average import split_served
from simulations.cli import simulate_scenario

DEADLINE_S = 600
METHODS: dict[str, dict[str, object]] = {
    "fedsa-lora": {"uniform-rank": 2},
    "fedit": {"uniform-rank": 2},
    "ffa-lora": {"uniform-rank": 2},
    "fedex-lora": {"uniform-rank": 2, "secure-aggregation": False},
    "flora": {"secure-aggregation": False},
    "flexlora": {"secure-aggregation": False, "served-average": 0.0},
    "hetlora": {"secure-aggregation": False},
    "exact-mixed-rank+fedadam": {"server-optimizer": "fedadam", "server-lr": 0.01},
}


def _params() -> list[Any]:
    slow = pytest.mark.slow
    return [pytest.param(name, marks=() if name == "fedsa-lora" else slow, id=name) for name in METHODS]


@pytest.mark.parametrize("method", _params())
def test_one_round_of_the_method_through_flower(method: str, tmp_path: Path, run_processes: Any) -> None:
    rule = method.split("+")[0]
    sets = {"aggregation": rule, "federated-eval-every": -1, **METHODS[method]}
    with run_processes(deadline_s=DEADLINE_S) as procs:
        try:
            out = simulate_scenario("dropout-check", 1, 0, tmp_path, sets, quiet=True)
        finally:
            assert not procs.timed_out, f"the {method} simulation ran past {DEADLINE_S} s and was stopped"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    done = rounds[1]
    assert done["participants"] == {"sensor": 10} and done["rejected"] == 0 and done["failures"] == 0
    assert done["secure"] is (METHODS[method].get("secure-aggregation", True) is not False)
    assert done["upload_bytes"] > 0 and np.isfinite(done["eval"]["sensor"]["accuracy"])
    state, optimizer = split_server_opt(load_checkpoint(out / "checkpoint.safetensors")[0])
    state, served = split_served(state)
    # the served average (the default) is checkpointed beside the state; flexlora runs without it
    assert (served is None) is (METHODS[method].get("served-average") == 0.0)
    assert served is None or set(served) == set(state)
    start = _initial(out, method)
    lora_b = [k for k in state if ".lora_B." in k]
    lora_a = [k for k in state if ".lora_A." in k]
    residuals = [k for k in state if k.endswith(".lora_residual")]
    moved = {k for k in state if not np.array_equal(state[k], start[k])}
    if rule in ("flora", "fedex-lora"):
        assert residuals and set(residuals) <= moved
    else:
        assert not residuals
    if rule == "flora":
        assert not any(state[k].any() for k in lora_b) and not moved & set(lora_a)
    elif rule == "fedsa-lora":
        assert not any(state[k].any() for k in lora_b) and set(lora_a) <= moved
    elif rule in ("fedit", "fedex-lora", "flexlora", "hetlora"):
        assert set(lora_a) <= moved and set(lora_b) <= moved
    else:
        assert not lora_a and set(lora_b) <= moved
    assert bool(optimizer) is ("+" in method)  # FedAdam's moments are in the checkpoint
    if "+" in method:
        assert set(optimizer) == {f"{m}/{k}" for k in moved for m in "mv"}


def _initial(out: Path, method: str) -> dict[str, np.ndarray]:
    from federation.config import RunConfig
    from federation.model.edge import initial_state

    info = json.loads((out / "checkpoint.json").read_text())
    run = RunConfig.parse(info["run_config"])
    return initial_state(run.scenario.tasks, run.lora, run.seed, run)

