"""Named scenarios: which fleet, how many devices per round, how long.

A scenario is data. Its fleet counts the devices registered per class and hardware tier
(`"phone/low"`, ...; a bare class such as `"tv"` means its top tier): `Scenario.tiers` keeps
those counts, `Scenario.fleet` the counts per class. The server samples per class
(`per_round`); a class's sampled devices follow its tier mix in expectation. Partition ids of a
Flower simulation are mapped onto the fleet interleaved (phone, tv, sensor, phone, ...) so that
any prefix of the nodes is a mixed fleet, and within a class the tiers are dealt round-robin
(low, mid, high, low, ...), so that neither a prefix nor the data clients' order lines up with a
tier. Which real data client (Shakespeare role, MovieLens viewer, watch subject) each device
holds is drawn from the seed.

A device's tier sets its LoRA rank (`devices.toml`): a mixed-tier fleet is a mixed-rank fleet.
Which task each class runs is the device catalogue's to say (`task = ...` in its class table);
a scenario's tasks are those of its classes.

Besides the built-in scenarios below, `get_scenario` finds scenarios that installed packages
declare in the entry-point group `fedge.scenarios`, and scenario files (`*.toml`, see
`load_scenario_file`), which may add device classes of their own to the catalogue.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from federation.devices import add_classes, class_task, class_tiers, device_classes, parse_catalogue, top_tier
from federation.errors import FedgeError
from federation.lr_schedule import check_final
from federation.optimizers import check_optimizer
from federation.tasks import get_task

SCENARIO_ENTRY_POINTS = "fedge.scenarios"


def class_task_name(device_class: str) -> str:
    """The name of the task a device class runs: its catalogue entry names it, the task registry
    resolves the name (or `module:attribute`), refusing an unknown one."""
    return get_task(class_task(device_class)).info.name


def _positive_counts(where: str, counts: dict[str, int]) -> None:
    for key, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FedgeError(f"{where} `{key}` must be a non-negative integer, got {n!r}")


def _tier_counts(where: str, counts: dict[str, int]) -> dict[str, int]:
    """`{"class/tier": n}` (n > 0) from counts keyed `"class/tier"` or `"class"` (its top tier)."""
    tiers: dict[str, int] = {}
    for key, n in counts.items():
        device_class, _, tier = key.partition("/")
        if not class_tiers(device_class):
            known = ", ".join(device_classes())
            raise FedgeError(f"{where} unknown device class in `{key}`: use one of {known}")
        tier = tier or top_tier(device_class)
        if tier not in class_tiers(device_class):
            known = ", ".join(class_tiers(device_class))
            raise FedgeError(f"{where} unknown tier `{key}`: {device_class} tiers are {known}")
        name = f"{device_class}/{tier}"
        if name in tiers:
            raise FedgeError(f"{where} `{name}` is named twice in the fleet")
        if n:
            tiers[name] = n
    return tiers


def _class_counts(tiers: dict[str, int]) -> dict[str, int]:
    fleet: dict[str, int] = {}
    for key, n in tiers.items():
        device_class = key.partition("/")[0]
        fleet[device_class] = fleet.get(device_class, 0) + n
    return fleet


@dataclass(frozen=True)
class Scenario:
    """A named run setting. `fleet` is given per class and tier, e.g. `{"phone/low": 6,
    "phone/high": 4, "tv": 12}` (a bare class: its top tier); after construction `fleet` holds
    the counts per class (what sampling, the partition order and data draws need) and `tiers`
    the counts per `"class/tier"`. Passing `tiers` too (as `dataclasses.replace` does) keeps it
    where it agrees with `fleet`."""

    name: str
    description: str
    fleet: dict[str, int]  # "class/tier" (or "class": its top tier) -> devices registered
    per_round: dict[str, int]  # device class -> devices sampled each round
    rounds: int
    # local training steps per round by device class: a watch's tiny CNN step costs ~1/50 of
    # a phone's MiniLM step, so a sensor can afford more of them in the same budget
    # (a class trained by local epochs, below: the most steps a device of it takes)
    local_steps: dict[str, int]
    # the local optimizer (federation.optimizers), LoRA learning rate and head learning rate by
    # device class, where they differ from the run's `local-optimizer`, `lr` and `head-lr` (a
    # class not named uses the run's): a TV takes 3 steps a round, with plain SGD
    optimizer: dict[str, str] = field(default_factory=dict)
    lr: dict[str, float] = field(default_factory=dict)
    head_lr: dict[str, float] = field(default_factory=dict)
    # device class -> local epochs: a device of the class takes ceil(epochs x its training
    # examples / batch) steps, at least 1 and at most its class's local_steps (the public bound
    # on its work and its weight), so a device with more data counts for more (FedAvg's local
    # epochs; `federation.training.epoch_steps`); a class not named takes local_steps steps
    local_epochs: dict[str, float] = field(default_factory=dict)
    # device class -> the fraction of its learning rates it trains with in the last round: its
    # `lr` and `head_lr` fall by cosine over the run's rounds (federation.lr_schedule); a class
    # not named uses the run's `lr-final` (1 by default: constant rates)
    lr_final: dict[str, float] = field(default_factory=dict)
    # caps on the server-side held-out evaluation per task (examples, drawn by seed); a task
    # not named here keeps its own cap (TaskInfo.eval_cap)
    eval_cap: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, int] | None = None  # "class/tier" -> devices registered (derived from `fleet`)
    # the simulated clock (federation/schedule.py): local hour of round 1, the round deadline,
    # and the server's cadence between rounds
    start_hour: float = 2.0
    deadline_s: float = 30.0
    round_interval_s: float = 300.0
    # registered devices the server looks at per round (0: all); a large fleet checks in lazily
    candidate_pool: int = 0
    # devices per task evaluated on-device (0: all the registry knows)
    eval_devices: int = 0
    # more devices than the dataset's natural clients: each client's data is split in shards
    synthetic: bool = False
    # whether this scenario models availability and the round clock (run config device-clock
    # can turn it off, not on)
    device_clock: bool = True
    # how `get_scenario` finds it again in another process: "" for a built-in scenario (its
    # name), else the scenario file's path or the entry point's name
    source: str = ""

    def __post_init__(self) -> None:
        where = f"scenario {self.name!r}:"
        _positive_counts(f"{where} fleet count for", self.fleet)
        _positive_counts(f"{where} per-round count for", self.per_round)
        tiers = _tier_counts(where, self.fleet)
        if self.tiers is not None:
            given = _tier_counts(where, self.tiers)
            if _class_counts(given) == _class_counts(tiers) and all("/" not in k for k in self.fleet):
                tiers = given  # `fleet` per class, as stored: the tiers say how each class splits
        fleet = _class_counts(tiers)
        for key in self.per_round:
            if key not in fleet:
                hint = " (the server samples per class)" if "/" in key else ""
                raise FedgeError(f"{where} per_round names `{key}`, not a class of its fleet{hint}")
        for name, rates in (("lr", self.lr), ("head_lr", self.head_lr), ("local_epochs", self.local_epochs)):
            for key, lr in rates.items():
                if key not in fleet:
                    raise FedgeError(f"{where} {name} names `{key}`, not a class of its fleet")
                if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
                    raise FedgeError(f"{where} {name} of `{key}` must be a number > 0, got {lr!r}")
        for key, final in self.lr_final.items():
            if key not in fleet:
                raise FedgeError(f"{where} lr_final names `{key}`, not a class of its fleet")
            if (why := check_final(final)) is not None:
                raise FedgeError(f"{where} lr_final of `{key}` {why}")
        for key, optimizer in self.optimizer.items():
            if key not in fleet:
                raise FedgeError(f"{where} optimizer names `{key}`, not a class of its fleet")
            if (why := check_optimizer(optimizer)) is not None:
                raise FedgeError(f"{where} optimizer of `{key}` {why}")
        object.__setattr__(self, "tiers", tiers)
        object.__setattr__(self, "fleet", fleet)

    @property
    def size(self) -> int:
        return sum(self.fleet.values())

    @property
    def ref(self) -> str:
        """What `get_scenario` takes to give this scenario back (in any process of the run)."""
        return self.source or self.name

    @property
    def tasks(self) -> tuple[str, ...]:
        """The names of the tasks the fleet's classes run, in fleet order; resolving them here
        refuses an unknown task (naming the known ones) before anything starts."""
        return tuple(dict.fromkeys(class_task_name(c) for c in self.fleet))

    def class_task(self, device_class: str) -> str:
        """The name of the task a class of this fleet runs."""
        return class_task_name(device_class)

    def class_tiers(self, device_class: str) -> dict[str, int]:
        """`{tier: count}` of one class in this fleet, in the order the scenario names them."""
        prefix = f"{device_class}/"
        return {k[len(prefix) :]: n for k, n in (self.tiers or {}).items() if k.startswith(prefix)}

    def tier_of(self, device_class: str, index: int) -> str:
        """The tier of the `index`-th device of a class: tiers dealt round-robin, O(tiers)."""
        counts = self.class_tiers(device_class)
        if not 0 <= index < sum(counts.values()):
            raise IndexError(f"{device_class} device {index} outside the fleet's {sum(counts.values())}")
        names = list(counts)
        dealt = 0  # full rounds dealt so far: every tier with more devices took one per round
        for level in sorted(set(counts.values())):
            active = [t for t in names if counts[t] > dealt]
            span = (level - dealt) * len(active)
            if index < span:
                return active[index % len(active)]
            index -= span
            dealt = level
        raise AssertionError("unreachable")


# The smart-home fleet: 40 devices of mixed tiers (so mixed LoRA ranks), shared by the default
# scenario and its variants (every device available; more viewers).
SMART_HOME_FLEET: dict[str, int] = {
    "phone/low": 5,
    "phone/mid": 5,
    "phone/high": 4,
    "tv/mid": 6,
    "tv/high": 4,
    "sensor/low": 8,
    "sensor/high": 8,
}
# A TV trains 3 steps a round, not 10: every step of the shared item side made the on-device
# (personalised) AUC fall, the item side turning toward the round's few viewers (in-process
# FedAvg of the fleet's TVs, seed 0, with the private fit then in use, 60 Adam steps: at 10
# steps 0.665 -> 0.650 by round 4 and its cold-start AUC peaked at round 2; at 3 steps 0.669 /
# 0.663 / 0.655 at rounds 4 / 8 / 12 and cold start 0.566 / 0.566 / 0.568).
# Since then a TV trains by local epochs (below), and 20 is the most steps one takes.
# A watch trains 60 steps a round (30 before 2026-12-02, with its lr; see SMART_HOME_LR_FINAL).
SMART_HOME_LOCAL_STEPS: dict[str, int] = {"phone": 10, "tv": 20, "sensor": 60}
# A TV trains 0.35 epochs of its viewer's ratings a round (ceil(0.35 n / batch) steps, 1-17 in
# the default fleet), not 3 steps whatever it holds: weighted by the examples it saw, each
# viewer then counts in the average as their ratings count in the pooled data (two of the ten
# viewers hold 1,068 of the 1,382 training ratings and 267 of the 347 held-out ones). With 3
# steps each, the average weighed every viewer alike, and weighting 3 steps by the viewer's
# ratings instead made a heavy viewer's noisy 48-rating delta dominate. In-process (served
# average, seed 0, 4 TVs a round, five sampling sequences, round 12): personalised AUC mean
# 0.673 -> 0.689 (up on all five), per-viewer AUC 0.596 -> 0.613, cold start 0.567 -> 0.566.
# docs/results.md, "The TVs' local work: epochs, not steps".
SMART_HOME_LOCAL_EPOCHS: dict[str, float] = {"tv": 0.35}
# A TV trains with plain SGD (LoRA B at 3, head at 0.1), not AdamW at 0.003: a TV restarts its
# optimizer every round and takes 3 steps, and Adam's first steps move every coordinate of the
# item side by the learning rate whatever its gradient, so the coordinates whose gradients are
# noise random-walk round after round (AdamW at the run's head rate 0.003 ended the personalised
# AUC below its start on 3 of 5 sampling sequences; at 0.001 above, the shared side barely
# moving). In-process, the served average, seed 0, five sampling sequences, AdamW at 0.001 ->
# SGD: cold start mean 0.564 -> 0.570, personalised 0.678 -> 0.682 (above its start on all
# five), per-viewer AUC 0.609 -> 0.603 (start 0.601). docs/results.md, "The TVs' local optimizer".
SMART_HOME_OPTIMIZER: dict[str, str] = {"tv": "sgd"}
SMART_HOME_LR: dict[str, float] = {"tv": 3.0, "sensor": 0.01}
SMART_HOME_HEAD_LR: dict[str, float] = {"tv": 0.1, "sensor": 0.01}
# A watch trains 60 AdamW steps a round at 0.01 (LoRA B and head), falling by cosine to 0.2x by
# the last round (federation/lr_schedule.py), not 30 steps at a constant 0.003: at night 0-8 of
# the 16 watches train a round, each holding 3-5 of the 7 exercises, and at a constant rate the
# sensor swung with the round's draw and was still rising at round 12 on unkind draws. In-process
# (the 16 watches alone, 8 a round at night, served average, plain sums, seeds 0-7, round 12):
# mean final accuracy 0.724 -> 0.733, mean of the last three 0.706 -> 0.727, their spread 0.039
# -> 0.017, within 0.02 on 4 -> 6 of 8 seeds; the same 60 steps at 0.01 without the decay 0.721 /
# 0.716 / 0.019 / 5 of 8. docs/results.md, "Learning-rate decay on the watches".
SMART_HOME_LR_FINAL: dict[str, float] = {"sensor": 0.2}


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="smart-home",
            description=(
                "a mixed home fleet at night: 14 phones (LoRA rank 2/4/8 by tier), 10 TVs (4/8), "
                "16 watches (2/4); up to 4 phones, 4 TVs and 8 watches per round, as availability allows"
            ),
            # 40 devices; more watches than TVs because a watch is eligible (charging, on Wi-Fi)
            # ~27% of the night against a TV's ~80%. Every watch of the dataset (16) and up to 8
            # a round: each watch holds 3-5 of the 7 exercises, and the fewer watches a round
            # averages, the more the model swings with which ones they were (in-process FedAvg,
            # seed 0, FedRS alpha 0.5, rounds 31-40: 4 a round 0.69-0.80, 8 a round 0.73-0.83,
            # all 16 0.77-0.79); at night ~4 of 16 are eligible a round.
            fleet=dict(SMART_HOME_FLEET),
            per_round={"phone": 4, "tv": 4, "sensor": 8},
            rounds=12,
            local_steps=dict(SMART_HOME_LOCAL_STEPS),
            local_epochs=dict(SMART_HOME_LOCAL_EPOCHS),
            optimizer=dict(SMART_HOME_OPTIMIZER),
            lr=dict(SMART_HOME_LR),
            head_lr=dict(SMART_HOME_HEAD_LR),
            lr_final=dict(SMART_HOME_LR_FINAL),
        ),
        Scenario(
            name="smart-home-every-watch",
            description=(
                "the smart-home fleet with every device available (no simulated night): up to 4 "
                "phones, 4 TVs and all 16 watches every round, 24 rounds"
            ),
            # What the default's models reach when availability does not bind: at night ~4 of
            # the 16 watches are eligible a round, and with so few each round's average moves
            # with which watches they were (in-process FedAvg, seed 0, FedRS alpha 0.5: 4 a
            # round swing by up to 0.1 between rounds over 40 rounds; all 16 rise steadily,
            # 0.75 by round 20). 24 rounds: at round 12 the sensor is still ~0.04 below its end.
            fleet=dict(SMART_HOME_FLEET),
            per_round={"phone": 4, "tv": 4, "sensor": 16},
            rounds=24,
            local_steps=dict(SMART_HOME_LOCAL_STEPS),
            local_epochs=dict(SMART_HOME_LOCAL_EPOCHS),
            optimizer=dict(SMART_HOME_OPTIMIZER),
            lr=dict(SMART_HOME_LR),
            head_lr=dict(SMART_HOME_HEAD_LR),
            lr_final=dict(SMART_HOME_LR_FINAL),
            device_clock=False,
        ),
        Scenario(
            name="smart-home-more-viewers",
            description=(
                "the smart-home fleet with 40 TVs instead of 10 (24 mid, 16 high), up to 8 a "
                "round; phones and watches as in the default, 12 rounds at night"
            ),
            # The TV's shared item side overfits the default's 10 viewers after a few rounds,
            # so their personalised AUC falls again; in-process (MAP private fit, FedAvg, seed
            # 0) 40 viewers, 8 a round, rose 0.664 -> 0.674 / 0.674 / 0.677 at rounds 4 / 8 / 12.
            fleet={**SMART_HOME_FLEET, "tv/mid": 24, "tv/high": 16},
            per_round={"phone": 4, "tv": 8, "sensor": 8},
            rounds=12,
            local_steps=dict(SMART_HOME_LOCAL_STEPS),
            local_epochs=dict(SMART_HOME_LOCAL_EPOCHS),
            optimizer=dict(SMART_HOME_OPTIMIZER),
            lr=dict(SMART_HOME_LR),
            head_lr=dict(SMART_HOME_HEAD_LR),
            lr_final=dict(SMART_HOME_LR_FINAL),
        ),
        Scenario(
            name="bench",
            description="fedge bench overhead: 10 top-tier devices, all of them every round",
            fleet={"phone": 4, "tv": 3, "sensor": 3},
            per_round={"phone": 4, "tv": 3, "sensor": 3},
            rounds=3,
            local_steps={"phone": 10, "tv": 10, "sensor": 30},
            eval_cap={"phone": 64, "sensor": 100_000},
            device_clock=False,
        ),
        Scenario(
            name="bench-50",
            description="fedge bench secagg: 50 devices, all of them every round",
            fleet={"phone": 20, "tv": 15, "sensor": 15},
            per_round={"phone": 20, "tv": 15, "sensor": 15},
            rounds=3,
            local_steps={"phone": 10, "tv": 10, "sensor": 30},
            eval_cap={"phone": 64, "sensor": 100_000},
            device_clock=False,
        ),
        Scenario(
            name="scale-100",
            description="fedge bench scale baseline: 100 registered devices, 100 per round (synthetic)",
            fleet={
                "phone/low": 20,
                "phone/mid": 20,
                "phone/high": 20,
                "tv/mid": 15,
                "tv/high": 10,
                "sensor/low": 8,
                "sensor/high": 7,
            },
            per_round={"phone": 60, "tv": 25, "sensor": 15},
            rounds=3,
            local_steps={"phone": 2, "tv": 2, "sensor": 5},
            eval_cap={"phone": 64, "tv": 1000, "sensor": 256},
            deadline_s=120.0,
            eval_devices=10,
            synthetic=True,
            device_clock=False,  # all 100 every round, as in scale-10k
        ),
        Scenario(
            name="scale-10k",
            description="10,000 registered devices (synthetic shards of the natural clients), 100 per round",
            fleet={
                "phone/low": 2000,
                "phone/mid": 2000,
                "phone/high": 2000,
                "tv/mid": 1500,
                "tv/high": 1000,
                "sensor/low": 800,
                "sensor/high": 700,
            },
            per_round={"phone": 60, "tv": 25, "sensor": 15},
            rounds=3,
            local_steps={"phone": 2, "tv": 2, "sensor": 5},
            eval_cap={"phone": 64, "tv": 1000, "sensor": 256},
            deadline_s=120.0,
            candidate_pool=600,
            eval_devices=10,
            synthetic=True,
        ),
        Scenario(
            name="deploy-check",
            description="3 watches, 1 secure round: a loopback deployment check (a process per message)",
            fleet={"sensor/low": 2, "sensor/high": 1},
            per_round={"sensor": 3},
            rounds=1,
            local_steps={"sensor": 10},
            eval_cap={"sensor": 100_000},
            device_clock=False,
        ),
        Scenario(
            name="deploy-mixed",
            description=(
                "2 phones, 2 TVs, 2 watches, all every round, 2 secure rounds: a loopback deployment "
                "check of every device class (a secure sum needs at least 2 devices per task)"
            ),
            fleet={
                "phone/low": 1,
                "phone/high": 1,
                "tv/mid": 1,
                "tv/high": 1,
                "sensor/low": 1,
                "sensor/high": 1,
            },
            per_round={"phone": 2, "tv": 2, "sensor": 2},
            rounds=2,
            local_steps={"phone": 6, "tv": 6, "sensor": 20},
            eval_cap={"phone": 256, "sensor": 100_000},
            device_clock=False,
        ),
        Scenario(
            name="dropout-check",
            description="10 watches, all every round: secure aggregation with devices vanishing",
            fleet={"sensor/low": 5, "sensor/high": 5},
            per_round={"sensor": 10},
            rounds=2,
            local_steps={"sensor": 10},
            device_clock=False,
        ),
        Scenario(
            name="smoke",
            description="a quick check of the whole pipeline: 10 devices of mixed ranks, 2 secure rounds",
            fleet={
                "phone/low": 1,
                "phone/mid": 1,
                "phone/high": 1,
                "tv/mid": 2,
                "tv/high": 2,
                "sensor/low": 2,
                "sensor/high": 1,
            },
            # three of each class every round (a secure sum needs a few devices per task); no
            # simulated availability: a 2-round pipeline check should not depend on who is awake
            per_round={"phone": 3, "tv": 3, "sensor": 3},
            device_clock=False,
            rounds=2,
            local_steps={"phone": 6, "tv": 6, "sensor": 20},
            eval_cap={"phone": 256, "sensor": 100_000},
        ),
    )
}


_loaded: dict[str, Scenario] = {}  # scenarios from files and entry points, by reference


def known_scenarios() -> list[str]:
    """Built-in scenario names, then those installed packages declare (entry points)."""
    installed = sorted(ep.name for ep in entry_points(group=SCENARIO_ENTRY_POINTS))
    return [*SCENARIOS, *(n for n in installed if n not in SCENARIOS)]


def get_scenario(name: str) -> Scenario:
    """A scenario by name: built-in, declared by an installed package (entry-point group
    `fedge.scenarios`, pointing at a `Scenario` or a scenario file), or the path of a `.toml`
    scenario file."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    if name in _loaded:
        return _loaded[name]
    found = {ep.name: ep for ep in entry_points(group=SCENARIO_ENTRY_POINTS)}
    if name in found:
        target = found[name].load()
        scenario = target if isinstance(target, Scenario) else load_scenario_file(Path(target))
    elif name.endswith(".toml"):
        scenario = load_scenario_file(Path(name))
    else:
        raise FedgeError(
            f"unknown scenario {name!r}: choose one of {', '.join(known_scenarios())}, "
            "or give the path of a scenario .toml file"
        )
    scenario = dataclasses.replace(scenario, source=name)
    _loaded[name] = scenario
    return scenario


_SCENARIO_KEYS = tuple(f.name for f in dataclasses.fields(Scenario) if f.name not in ("tiers", "source"))
_SCENARIO_KINDS: dict[str, type] = {
    **dict.fromkeys(("name", "description"), str),
    **dict.fromkeys(
        (
            "fleet",
            "per_round",
            "local_steps",
            "optimizer",
            "lr",
            "head_lr",
            "local_epochs",
            "lr_final",
            "eval_cap",
        ),
        dict,
    ),
    **dict.fromkeys(("rounds", "candidate_pool", "eval_devices"), int),
    **dict.fromkeys(("start_hour", "deadline_s", "round_interval_s"), float),
    **dict.fromkeys(("synthetic", "device_clock"), bool),
}


def load_scenario_file(path: Path) -> Scenario:
    """A scenario from a TOML file: a `[scenario]` table with `Scenario`'s fields (`fleet`,
    `per_round`, `local_steps`, `optimizer`, `lr`, `head_lr`, `local_epochs` and `lr_final` as inline
    tables), and optionally `[devices.CLASS]` tables in the layout of `federation/devices.toml`,
    which add device classes to the catalogue."""
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedgeError(f"scenario file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedgeError(f"scenario file {path} is not valid TOML ({exc})") from None
    extra = sorted(set(raw) - {"scenario", "devices"})
    if extra or not isinstance(raw.get("scenario"), dict):
        raise FedgeError(
            f"scenario file {path}: needs a [scenario] table and optional [devices.CLASS] tables, got {extra}"
        )
    if "devices" in raw:
        added = parse_catalogue(raw["devices"], str(path))
        for profile in added.values():  # an unknown task is refused before the catalogue changes
            get_task(profile.task)
        add_classes(added, f"scenario file {path}")
    fields = raw["scenario"]
    unknown = sorted(set(fields) - set(_SCENARIO_KEYS))
    if unknown:
        known = ", ".join(_SCENARIO_KEYS)
        raise FedgeError(f"scenario file {path}: unknown key `{unknown[0]}` in [scenario] (known: {known})")
    for key, value in fields.items():
        kind = _SCENARIO_KINDS[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok or (kind in (int, float) and value < 0):
            what = {dict: "a table", str: "a string", bool: "true or false"}.get(kind, "a number >= 0")
            raise FedgeError(f"scenario file {path}: `{key}` must be {what}, got {value!r}")
    try:
        return Scenario(**fields)
    except (TypeError, FedgeError) as exc:  # a missing field; a count, class or rate it refuses
        raise FedgeError(f"scenario file {path}: {exc}") from None


def _is_named(scenario: Scenario) -> bool:
    """Whether `get_scenario(scenario.ref)` gives this very scenario (not a modified copy)."""
    return (SCENARIOS.get(scenario.ref) or _loaded.get(scenario.ref)) is scenario


def fleet_order(scenario: Scenario) -> list[tuple[str, int]]:
    """(device class, index within class) for each partition id, classes interleaved.

    Built once per process and scenario (a 10,000-device fleet is 10,000 small tuples)."""
    return list(_fleet_order(scenario.ref)) if _is_named(scenario) else _build_order(scenario)


@functools.lru_cache(maxsize=8)
def _fleet_order(ref: str) -> tuple[tuple[str, int], ...]:
    return tuple(_build_order(get_scenario(ref)))


def partition_device(scenario: Scenario, partition_id: int) -> tuple[str, int]:
    """(device class, index within class) of one partition id, without copying the order."""
    order = _fleet_order(scenario.ref) if _is_named(scenario) else tuple(_build_order(scenario))
    return order[partition_id]


def _build_order(scenario: Scenario) -> list[tuple[str, int]]:
    order: list[tuple[str, int]] = []
    remaining = dict(scenario.fleet)
    index = dict.fromkeys(scenario.fleet, 0)
    while any(remaining.values()):
        for cls in scenario.fleet:
            if remaining[cls]:
                order.append((cls, index[cls]))
                index[cls] += 1
                remaining[cls] -= 1
    return order
