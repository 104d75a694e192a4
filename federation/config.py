"""The run configuration: every key of `[tool.flwr.app.config]`, parsed and validated once.

A malformed value fails at start with one line naming the key and what it should be, rather
than deep inside round 7.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from federation.errors import FedgeError
from federation.model.lora import LoraSettings
from federation.scenarios import Scenario, get_scenario
from federation.training import TrainSettings


def _get(cfg: Mapping[str, Any], key: str, kind: type, default: Any, check: str = "") -> Any:
    value = cfg.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FedgeError(
            f"run config {key}={value!r} must be {'an' if kind is int else 'a'} {kind.__name__}: "
            f"fix it in [tool.flwr.app.config] or with -c '{key}=...'"
        )
    if check == "positive" and not value > 0:
        raise FedgeError(f"run config {key}={value!r} must be > 0")
    if check == "nonneg" and value < 0:
        raise FedgeError(f"run config {key}={value!r} must be >= 0")
    return value


@dataclass(frozen=True)
class RunConfig:
    scenario: Scenario
    rounds: int
    seed: int
    lora: LoraSettings
    train: TrainSettings
    tv_user_dim: int
    seq_len: int
    out_dir: str
    cache_dir: str
    round_timeout: float
    client_threads: int
    federated_eval_every: int
    initial_checkpoint: str
    local_steps: int  # 0: the scenario's steps per device class
    max_weight: float  # largest aggregation weight (examples) one device may claim in a round
    secure_aggregation: bool  # the server learns only sums of updates (federation/secagg)
    secagg_clip: float  # updates are clipped to +-clip per coordinate before fixed-point encoding
    secagg_value_bits: int  # fixed-point bits per coordinate (sign included)
    dropout_after_keys: float  # simulation knob: fraction of devices vanishing after key sharing
    secagg_min_devices: int  # a task's round needs at least this many devices to be aggregated
    secagg_pki: (
        str  # "": no certified keys; else a directory with the operator CA's ca.pub (federation/secagg/pki)
    )
    device_clock: bool  # sample by simulated availability, over-select, deadline, dropouts
    bench_alternate: bool  # benchmarks only: odd rounds plain, even rounds secure (same run)
    uniform_rank: int  # 0: each device trains its tier's LoRA rank; r: every device trains rank r

    def secure_round(self, server_round: int) -> bool:
        """Whether this round aggregates securely."""
        if self.bench_alternate:
            return server_round % 2 == 0
        return self.secure_aggregation

    def task_max_weight(self, task: str) -> int:
        """The largest weight one device of `task` can honestly claim: its examples seen, at most
        steps x batch of its class (public), capped by max-weight. Secure aggregation sizes its
        modulus on it and devices refuse rounds planned for another bound."""
        from federation.scenarios import DEVICE_TASK

        bounds = [
            self.train_for(c).steps * self.train.batch_size
            for c in self.scenario.fleet
            if DEVICE_TASK[c] == task
        ]
        return max(1, min(int(self.max_weight), max(bounds, default=int(self.max_weight))))

    def train_for(self, device_class: str) -> TrainSettings:
        """Local work of one device class: the scenario's steps unless local-steps is set."""
        steps = self.local_steps or self.scenario.local_steps.get(device_class, self.train.steps)
        return replace(self.train, steps=steps)

    @classmethod
    def parse(cls, cfg: Mapping[str, Any]) -> RunConfig:
        scenario = get_scenario(_get(cfg, "scenario", str, "smart-home"))
        rounds = _get(cfg, "num-rounds", int, 0, "nonneg") or scenario.rounds
        steps = _get(cfg, "local-steps", int, 0, "nonneg")
        targets = tuple(
            t.strip() for t in _get(cfg, "lora-targets", str, "query,value").split(",") if t.strip()
        )
        known_targets = {"query", "key", "value", "dense"}
        if not targets or not set(targets) <= known_targets:  # checked first: the message names the key
            raise FedgeError(f"run config lora-targets={targets} must be among {sorted(known_targets)}")
        try:
            lora = LoraSettings(
                rank=_get(cfg, "lora-rank", int, 8, "positive"),
                alpha=_get(cfg, "lora-alpha", int, 16, "positive"),
                targets=targets,
            )
            train = TrainSettings(
                steps=steps or max(scenario.local_steps.values()),
                batch_size=_get(cfg, "batch-size", int, 16, "positive"),
                lr=_get(cfg, "lr", float, 3e-3, "positive"),
                head_lr=_get(cfg, "head-lr", float, 3e-3, "positive"),
                private_lr=_get(cfg, "private-lr", float, 5e-2, "positive"),
            )
        except ValueError as exc:
            raise FedgeError(f"run config: {exc}") from None
        return cls(
            scenario=scenario,
            rounds=rounds,
            seed=_get(cfg, "seed", int, 0, "nonneg"),
            lora=lora,
            train=train,
            tv_user_dim=_get(cfg, "tv-user-dim", int, 16, "positive"),
            seq_len=_get(cfg, "seq-len", int, 32, "positive"),
            out_dir=_get(cfg, "out-dir", str, ""),
            cache_dir=_get(cfg, "cache-dir", str, ""),
            round_timeout=_get(cfg, "round-timeout", float, 600.0, "positive"),
            client_threads=_get(cfg, "client-threads", int, 1, "positive"),
            federated_eval_every=_get(cfg, "federated-eval-every", int, 4),
            initial_checkpoint=_get(cfg, "initial-checkpoint", str, ""),
            local_steps=steps,
            max_weight=_get(cfg, "max-weight", float, 100_000.0, "positive"),
            secure_aggregation=_get(cfg, "secure-aggregation", bool, True),
            secagg_clip=_get(cfg, "secagg-clip", float, 1.0, "positive"),
            secagg_value_bits=_get(cfg, "secagg-value-bits", int, 24, "positive"),
            dropout_after_keys=_get(cfg, "dropout-after-keys", float, 0.0, "nonneg"),
            secagg_min_devices=max(2, _get(cfg, "secagg-min-devices", int, 3, "positive")),
            secagg_pki=_get(cfg, "secagg-pki", str, ""),
            device_clock=_get(cfg, "device-clock", bool, True) and scenario.device_clock,
            bench_alternate=_get(cfg, "bench-alternate", bool, False),
            uniform_rank=_get(cfg, "uniform-rank", int, 0, "nonneg"),
        )
