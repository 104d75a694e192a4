"""The run configuration: every key of `[tool.flwr.app.config]`, parsed and validated once.

A malformed value fails at start with one line naming the key and what it should be, rather
than deep inside round 7; an unknown key fails too, naming the closest known ones. Every default
is read from `[tool.flwr.app.config]` of pyproject.toml (`federation.defaults`): a key missing
from the mapping given to `RunConfig.parse` takes the value written there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from federation.defaults import run_defaults
from federation.errors import FedgeError
from federation.model.lora import LoraSettings
from federation.optimizers import check_optimizer
from federation.rules import Rule, get_rule
from federation.rules.server_opt import ServerOptimizer
from federation.scenarios import Scenario, get_scenario
from federation.served_average import check_decay
from federation.training import TrainSettings

KIND_WORDS = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string"}


@dataclass(frozen=True)
class ConfigSource:
    """Where the user sets run-config keys, so that an error tells them what to retype.

    `flag` is the override flag they use: `-c` for `flwr run` (the apps cannot tell a `-c`
    value from a `[tool.flwr.app.config]` one) or `--set` for `fedge simulate`, which knows the
    keys the user gave (`given`).
    """

    flag: str = "-c"
    given: frozenset[str] = frozenset()

    def fix(self, key: str) -> str:
        if self.flag == "-c":
            return f"fix it in [tool.flwr.app.config] or with -c '{key}=...'"
        if key in self.given:
            return f"fix it with {self.flag} {key}=..."
        return f"fix it in [tool.flwr.app.config] of pyproject.toml or with {self.flag} {key}=..."


FLWR_RUN = ConfigSource()


class SourcedConfig(dict[str, Any]):
    """A run config that remembers where its user sets it, for the error messages of `_get`."""

    def __init__(self, cfg: Mapping[str, Any], source: ConfigSource) -> None:
        super().__init__(cfg)
        self.source = source


def unknown_setting_error(given: Iterable[str], known: Iterable[str]) -> str | None:
    """A one-line refusal of the first key of `given` that is not in `known`, naming the closest
    known keys (difflib), or None when every key is known. Pure: no files, no Flower."""
    known_keys = sorted(set(known))
    for key in given:
        if key in known_keys:
            continue
        near = difflib.get_close_matches(key, known_keys, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(near)}?" if near else f"known settings: {', '.join(known_keys)}"
        where = "the settings are [tool.flwr.app.config] of pyproject.toml"
        return f"run config has no setting {key!r}: {hint} ({where})"
    return None


def _get(cfg: Mapping[str, Any], key: str, kind: type, check: str = "") -> Any:
    source = cfg.source if isinstance(cfg, SourcedConfig) else FLWR_RUN
    value = cfg[key] if key in cfg else run_defaults()[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FedgeError(f"run config {key}={value!r} must be {KIND_WORDS[kind]}: {source.fix(key)}")
    if check == "positive" and not value > 0:
        raise FedgeError(f"run config {key}={value!r} must be > 0: {source.fix(key)}")
    if check == "nonneg" and value < 0:
        raise FedgeError(f"run config {key}={value!r} must be >= 0: {source.fix(key)}")
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
    aggregation: str  # the aggregation rule's name (federation/rules)
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
    # robustness and distributed differential privacy (docs/privacy.md)
    max_update_norm: float = 0.0  # plain rounds: deltas longer than this (L2) are clipped; 0: off
    dp_mechanism: str = "none"  # "none", "distributed-discrete-gaussian" or "skellam"
    dp_noise_multiplier: float = 0.0  # the sum's noise std / dp_clip
    dp_clip: float = 0.1  # L2 clip of each device's update, on the device
    dp_delta: float = 1e-5  # the accountant's delta
    # a task head's class rows are averaged over the devices holding each class (rules built on
    # exact-mixed-rank's sums; federation.rules.exact_mixed_rank); False: every device weighs every row
    class_wise_heads: bool = True

    @property
    def dp(self) -> bool:
        """Whether devices clip, rotate and noise their updates (distributed DP)."""
        return self.dp_mechanism != "none"

    # -- research methods (docs/methods.md): the server optimizer over the rule's update
    server_optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    # what the server evaluates and exports: a moving average of the global states with this
    # decay (federation.served_average); 0: the latest state
    served_average: float = 0.0

    @property
    def rule(self) -> Rule:
        """The run's aggregation rule (resolved at parse: an unknown name never gets here)."""
        return get_rule(self.aggregation)

    def secure_round(self, server_round: int) -> bool:
        """Whether this round aggregates securely."""
        if self.bench_alternate:
            return server_round % 2 == 0
        return self.secure_aggregation

    def task_max_weight(self, task: str) -> int:
        """The largest weight one device of `task` can honestly claim: its examples seen, at most
        steps x batch of its class (public), capped by max-weight. Secure aggregation sizes its
        modulus on it and devices refuse rounds planned for another bound."""
        bounds = [
            self.train_for(c).steps * self.train.batch_size
            for c in self.scenario.fleet
            if self.scenario.class_task(c) == task
        ]
        return max(1, min(int(self.max_weight), max(bounds, default=int(self.max_weight))))

    def train_for(self, device_class: str) -> TrainSettings:
        """Local work of one device class: the scenario's steps unless local-steps is set, and
        the scenario's local optimizer, lr, head lr and lr-final for the class where it names
        them (else the run's local-optimizer, lr, head-lr and lr-final)."""
        scenario = self.scenario
        return replace(
            self.train,
            steps=self.local_steps or scenario.local_steps.get(device_class, self.train.steps),
            optimizer=scenario.optimizer.get(device_class, self.train.optimizer),
            lr=scenario.lr.get(device_class, self.train.lr),
            head_lr=scenario.head_lr.get(device_class, self.train.head_lr),
            lr_final=scenario.lr_final.get(device_class, self.train.lr_final),
        )

    @classmethod
    def parse(cls, cfg: Mapping[str, Any], source: ConfigSource = FLWR_RUN) -> RunConfig:
        """Validate a run config; keys it lacks take their pyproject.toml defaults, and a bad
        value's error names the key and how `source` fixes it."""
        refusal = unknown_setting_error(cfg, run_defaults())
        if refusal:
            raise FedgeError(refusal)
        cfg = SourcedConfig(cfg, source)
        scenario = get_scenario(_get(cfg, "scenario", str))
        scenario.tasks  # noqa: B018 -- resolves every task the fleet runs: an unknown one fails here
        rounds = _get(cfg, "num-rounds", int, "nonneg") or scenario.rounds
        steps = _get(cfg, "local-steps", int, "nonneg")
        targets = tuple(t.strip() for t in _get(cfg, "lora-targets", str).split(",") if t.strip())
        known_targets = {"query", "key", "value", "dense"}
        if not targets or not set(targets) <= known_targets:  # checked first: the message names the key
            raise FedgeError(
                f"run config lora-targets={targets} must be among {sorted(known_targets)}: "
                f"{source.fix('lora-targets')}"
            )
        local_optimizer = _get(cfg, "local-optimizer", str)
        if (why := check_optimizer(local_optimizer)) is not None:
            raise FedgeError(f"run config local-optimizer {why}: {source.fix('local-optimizer')}")
        try:
            lora = LoraSettings(
                rank=_get(cfg, "lora-rank", int, "positive"),
                alpha=_get(cfg, "lora-alpha", int, "positive"),
                targets=targets,
            )
            train = TrainSettings(
                steps=steps or max(scenario.local_steps.values()),
                batch_size=_get(cfg, "batch-size", int, "positive"),
                lr=_get(cfg, "lr", float, "positive"),
                head_lr=_get(cfg, "head-lr", float, "positive"),
                private_lr=_get(cfg, "private-lr", float, "positive"),
                private_l2=_get(cfg, "private-l2", float, "positive"),
                absent_class_scale=_get(cfg, "absent-class-scale", float, "nonneg"),
                optimizer=local_optimizer,
                lr_final=_get(cfg, "lr-final", float, "positive"),
            )
        except ValueError as exc:
            raise FedgeError(f"run config: {exc}") from None
        aggregation = _get(cfg, "aggregation", str)
        try:
            rule = get_rule(aggregation)
        except FedgeError as exc:
            raise FedgeError(f"run config aggregation: {exc}: {source.fix('aggregation')}") from None
        secure = _get(cfg, "secure-aggregation", bool)
        if not rule.is_sum and (secure or _get(cfg, "bench-alternate", bool)):
            raise FedgeError(
                f"run config aggregation={aggregation!r} cannot run with secure aggregation: it is not a "
                f"sum of device uploads ({rule.not_sum_reason}); set secure-aggregation = false "
                f"(bench-alternate = false) or choose a sum rule: {source.fix('aggregation')}"
            )
        # -- research methods (docs/methods.md): what the rule needs of the fleet, the server optimizer
        uniform = _get(cfg, "uniform-rank", int, "nonneg")
        if rule.adapter.uniform_rank and not uniform:
            ranks = fleet_ranks(scenario, lora.rank)
            if len(ranks) > 1:
                raise FedgeError(
                    f"run config aggregation={aggregation!r} needs every device to train one LoRA rank, "
                    f"and the {scenario.name} fleet mixes ranks {sorted(ranks)}: set uniform-rank "
                    f"(e.g. {min(ranks)}) or choose a mixed-rank rule: {source.fix('uniform-rank')}"
                )
        try:
            server_optimizer = ServerOptimizer(
                kind=_get(cfg, "server-optimizer", str),
                lr=_get(cfg, "server-lr", float, "positive"),
                momentum=_get(cfg, "server-momentum", float, "nonneg"),
                beta1=_get(cfg, "server-beta1", float, "nonneg"),
                beta2=_get(cfg, "server-beta2", float, "nonneg"),
                tau=_get(cfg, "server-tau", float, "positive"),
            )
        except ValueError as exc:
            raise FedgeError(f"run config: {exc}: {source.fix('server-optimizer')}") from None
        served_average = _get(cfg, "served-average", float)
        if (why := check_decay(served_average)) is not None:
            raise FedgeError(f"run config served-average {why}: {source.fix('served-average')}")
        if served_average > 0 and not rule.state_averages:
            raise FedgeError(
                f"run config served-average={served_average} averages global states, and under "
                f"aggregation={aggregation!r} {rule.not_averaged_reason}: set served-average = 0 or "
                f"choose another rule: {source.fix('served-average')}"
            )
        return cls(
            scenario=scenario,
            rounds=rounds,
            seed=_get(cfg, "seed", int, "nonneg"),
            lora=lora,
            train=train,
            tv_user_dim=_get(cfg, "tv-user-dim", int, "positive"),
            seq_len=_get(cfg, "seq-len", int, "positive"),
            out_dir=_get(cfg, "out-dir", str),
            cache_dir=_get(cfg, "cache-dir", str),
            round_timeout=_get(cfg, "round-timeout", float, "positive"),
            client_threads=_get(cfg, "client-threads", int, "positive"),
            federated_eval_every=_get(cfg, "federated-eval-every", int),
            initial_checkpoint=_get(cfg, "initial-checkpoint", str),
            local_steps=steps,
            max_weight=_get(cfg, "max-weight", float, "positive"),
            aggregation=aggregation,
            secure_aggregation=secure,
            secagg_clip=_get(cfg, "secagg-clip", float, "positive"),
            secagg_value_bits=_get(cfg, "secagg-value-bits", int, "positive"),
            dropout_after_keys=_get(cfg, "dropout-after-keys", float, "nonneg"),
            secagg_min_devices=max(2, _get(cfg, "secagg-min-devices", int, "positive")),
            secagg_pki=_get(cfg, "secagg-pki", str),
            device_clock=_get(cfg, "device-clock", bool) and scenario.device_clock,
            bench_alternate=_get(cfg, "bench-alternate", bool),
            uniform_rank=_get(cfg, "uniform-rank", int, "nonneg"),
            class_wise_heads=_get(cfg, "class-wise-heads", bool),
            **_privacy_settings(cfg, source, rule, secure, _get(cfg, "bench-alternate", bool)),
            server_optimizer=server_optimizer,
            served_average=served_average,
        )


DP_MECHANISMS = ("none", "distributed-discrete-gaussian", "skellam")


def _privacy_settings(
    cfg: Mapping[str, Any], source: ConfigSource, rule: Rule, secure: bool, alternate: bool
) -> dict[str, Any]:
    """The norm bound and the distributed-DP settings, validated: DP needs secure aggregation in
    every round and a rule that is a sum (the noise is added to the sum, on the devices)."""
    mechanism = _get(cfg, "dp-mechanism", str)
    if mechanism not in DP_MECHANISMS:
        raise FedgeError(
            f"run config dp-mechanism={mechanism!r} must be one of {', '.join(DP_MECHANISMS)}: "
            f"{source.fix('dp-mechanism')}"
        )
    delta = _get(cfg, "dp-delta", float, "positive")
    if not delta < 1:
        raise FedgeError(f"run config dp-delta={delta!r} must be in (0, 1): {source.fix('dp-delta')}")
    settings = {
        "max_update_norm": _get(cfg, "max-update-norm", float, "nonneg"),
        "dp_mechanism": mechanism,
        "dp_noise_multiplier": _get(cfg, "dp-noise-multiplier", float, "nonneg"),
        "dp_clip": _get(cfg, "dp-clip", float, "positive"),
        "dp_delta": delta,
    }
    if mechanism != "none":
        if not secure or alternate:
            raise FedgeError(
                f"run config dp-mechanism={mechanism!r} needs secure-aggregation = true (and bench-alternate "
                "= false): devices add shares of the noise, which only sum to the promised noise inside "
                f"a secure sum; {source.fix('secure-aggregation')}"
            )
        if not rule.is_sum:
            raise FedgeError(
                f"run config dp-mechanism={mechanism!r} needs an aggregation rule that is a sum, not "
                f"{rule.name!r}: {source.fix('aggregation')}"
            )
    return settings


def fleet_ranks(scenario: Scenario, r_max: int) -> set[int]:
    """The LoRA ranks the scenario's devices train by their tiers (capped by the model's r_max)."""
    from federation.devices import default_catalogue

    catalogue = default_catalogue()
    ranks = set()
    for name in scenario.tiers or {}:
        device_class, _, tier = name.partition("/")
        ranks.add(min(catalogue[(device_class, tier)].lora_rank, r_max))
    return ranks
