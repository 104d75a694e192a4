"""Server optimizers over any rule (`federation.rules.server_opt`; Reddi et al., ICLR 2021):
FedAvgM and FedAdam steps worked by hand, the settings' checks, and the optimizer state kept
in the server's checkpoint so that `--resume` takes the same steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.rules.server_opt import ServerOptimizer, step
from server.loop import RunState
from server.round import MetricsEntry

X = "phone/lora.q.lora_B.weight"


def test_fedavgm_accumulates_momentum_by_hand() -> None:
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    x0 = {X: np.array([1.0, 2.0])}
    # round 1: Delta = (0.2, -0.4): m = Delta, x = x0 + 0.5 m
    x1, s1 = step(opt, x0, {X: np.array([1.2, 1.6])}, {})
    np.testing.assert_allclose(x1[X], [1.1, 1.8])
    # round 2: Delta = (0.1, 0.0): m = 0.9 (0.2, -0.4) + (0.1, 0) = (0.28, -0.36)
    x2, s2 = step(opt, x1, {X: x1[X] + np.array([0.1, 0.0])}, s1)
    np.testing.assert_allclose(s2[f"m/{X}"], [0.28, -0.36])
    np.testing.assert_allclose(x2[X], [1.1 + 0.14, 1.8 - 0.18])
    # round 3: nobody moved it: it coasts on 0.9 m
    x3, _ = step(opt, x2, dict(x2), s2)
    np.testing.assert_allclose(x3[X], x2[X] + 0.5 * 0.9 * np.array([0.28, -0.36]))


def test_fedadam_by_hand() -> None:
    opt = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x0 = {X: np.array([0.0, 0.0])}
    x1, s1 = step(opt, x0, {X: np.array([0.4, -0.01])}, {})
    m = 0.1 * np.array([0.4, -0.01])
    v = 0.01 * np.array([0.16, 0.0001])
    np.testing.assert_allclose(s1[f"m/{X}"], m)
    np.testing.assert_allclose(s1[f"v/{X}"], v)
    np.testing.assert_allclose(x1[X], 0.1 * m / (np.sqrt(v) + 1e-3))
    # by hand: 0.1 x 0.04 / (0.04 + 0.001) and 0.1 x 0.001 / (0.001 + 0.001): tau keeps a tiny
    # coordinate's step below lr
    np.testing.assert_allclose(x1[X], [0.1 * 0.04 / 0.041, -0.05], atol=1e-9)


def test_none_at_server_lr_scales_the_rules_step() -> None:
    x1, state = step(ServerOptimizer("none", lr=0.5), {X: np.array([1.0])}, {X: np.array([3.0])}, {})
    np.testing.assert_allclose(x1[X], [2.0])
    assert state == {}


def test_settings_are_checked_at_parse() -> None:
    with pytest.raises(FedgeError, match="server optimizer 'adam' is not one of none, fedavgm, fedadam"):
        RunConfig.parse({"scenario": "smoke", "server-optimizer": "adam"})
    with pytest.raises(FedgeError, match=r"server-momentum must lie in \[0, 1\)"):
        RunConfig.parse({"scenario": "smoke", "server-optimizer": "fedavgm", "server-momentum": 1.0})
    run = RunConfig.parse({"scenario": "smoke", "server-optimizer": "fedadam", "server-lr": 0.05})
    assert run.server_optimizer == ServerOptimizer("fedadam", lr=0.05)


def test_the_optimizer_state_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    config = {"scenario": "deploy-check", "secure-aggregation": False, "out-dir": str(tmp_path),
              "server-optimizer": "fedavgm", "server-lr": 1.0, "server-momentum": 0.5}  # fmt: skip
    fed = RunState(None, RunConfig.parse(config), 0, config)  # type: ignore[arg-type]
    key = next(k for k in fed.state if ".lora_B." in k)
    moved = {**fed.state, key: fed.state[key] + 0.25}
    fed.state = fed.server_step(fed.state, moved)
    assert np.allclose(fed.server_opt_state[f"m/{key}"], 0.25)
    fed.write(MetricsEntry(round=1, eval={}, federated={}, wall_seconds=1.0))
    resumed_config = {**config, "initial-checkpoint": str(tmp_path / "checkpoint.safetensors")}
    resumed = RunState(None, RunConfig.parse(resumed_config), 0, resumed_config)  # type: ignore[arg-type]
    assert set(resumed.state) == set(fed.state)  # the optimizer's arrays are not part of the model
    np.testing.assert_array_equal(resumed.server_opt_state[f"m/{key}"], fed.server_opt_state[f"m/{key}"])
    # the same next step as the run that never stopped: coasting on 0.5 m
    a = fed.server_step(fed.state, dict(fed.state))
    b = resumed.server_step(resumed.state, dict(resumed.state))
    np.testing.assert_allclose(a[key], b[key])
    np.testing.assert_allclose(a[key], fed.state[key] + 0.125, atol=1e-6)
