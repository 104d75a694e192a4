"""What the simulated clock charges a device for its upload (`RunState.upload_bytes`).

With secure aggregation a device uploads its masked vector packed to m bits per coordinate, m
sized for the round's group of that task; without, its float32 contribution. The clock of every
device-clock scenario (the default `smart-home`) calls this for each task before round 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from federation.config import RunConfig
from federation.rules.exact_mixed_rank import expected_shapes
from federation.secagg.packing import packed_size
from federation.secagg.protocol import required_modulus_bits
from federation.secagg.vector import vector_length
from server.loop import RunState


@pytest.fixture(scope="module", params=[True, False], ids=["secure", "plain"])
def fed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RunState:
    out = tmp_path_factory.mktemp("run")
    config = {"scenario": "smart-home", "out-dir": str(out), "secure-aggregation": request.param}
    run = RunConfig.parse(config)
    return RunState(None, run)  # type: ignore[arg-type]  # no messages are sent


@pytest.mark.parametrize("task", ["phone", "tv", "sensor"])
def test_each_tasks_upload_matches_its_mode(fed: RunState, task: str) -> None:
    shapes = fed.task_shapes(task)
    scenario = fed.run.scenario
    group = sum(k for c, k in scenario.per_round.items() if scenario.class_task(c) == task)
    m = required_modulus_bits(fed.run.secagg_value_bits, group, fed.run.task_max_weight(task))
    plain = 4 * sum(int(np.prod(s)) for s in expected_shapes(shapes).values())  # float32
    if not fed.run.secure_aggregation:
        assert fed.upload_bytes(task) == plain
        return
    assert fed.upload_bytes(task) == packed_size(vector_length(fed.run.rule, shapes), m)
    assert plain < fed.upload_bytes(task) <= 1.25 * plain  # m bits, not a 64-bit word per coordinate
