"""ServerApp on the legacy path: LegacyContext + legacy FedAvg + DefaultWorkflow(SecAggPlusWorkflow)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from legacy_anchor.common import global_keys_and_state, run_config

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's time from configure_fit to aggregate_fit."""

    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out, self.started, self.rounds = out, 0.0, []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self.started = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.rounds.append(
            {"round": server_round, "seconds": time.perf_counter() - self.started,
             "results": len(results), "failures": len(failures)}
        )  # fmt: skip
        self.out.write_text(json.dumps(self.rounds))
        return aggregated


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    run = run_config(cfg)
    keys, state = global_keys_and_state(run)
    n = run.scenario.size
    out = Path(str(cfg["out-dir"]) or ".") / "legacy_rounds.json"
    strategy = TimedFedAvg(
        out,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([state[k] for k in keys]),
        on_fit_config_fn=lambda r: {"round": r},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=int(cfg["num-rounds"])), strategy=strategy
    )
    # The settings measured in docs/architecture.md, "Secure aggregation" (num_shares=0.5,
    # threshold=0.6); timeout so that a stalled stage cannot hang the benchmark.
    fit = (
        SecAggPlusWorkflow(num_shares=0.5, reconstruction_threshold=0.6, timeout=600.0)
        if cfg["secure"]
        else None
    )
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
