"""Device profiles as data: the phone / sensor / TV catalogue, its validation, availability.

A profile (docs/architecture.md, "Devices") is what a simulated device can do and when it may take part:
compute speed, memory budget (and the LoRA rank and batch it allows), up/down bandwidth, energy
per step, a mid-round dropout probability, and availability: a daily online pattern plus the
Gboard eligibility rule of training only while charging, idle and on an unmetered network
(Hard et al., "Federated Learning for Mobile Keyboard Prediction", 2018; Bonawitz et al.,
"Towards Federated Learning at Scale: System Design", SysML 2019). The numbers live in
`devices.toml` next to this module, each with its source; this module only loads, checks and
samples them. Which task a class runs is data too: each class table names it (`task = "phone"`,
a name in the task registry or `module:attribute`), so a new class (a tablet running the phone
task) is a catalogue entry, not code.

Per-device randomness is drawn from `numpy.random.default_rng((seed, device, round, stream))`,
so a device's draws depend on nothing but those four integers: any process, any sampling order,
any number of registered devices gives the same answer (and nothing per device is stored).
These are simulation draws, not cryptographic randomness.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import FedgeError

CATALOGUE_PATH = Path(__file__).with_name("devices.toml")
HOURS = 24

# Independent random streams per (seed, device, round): eligibility and dropout must not share
# draws, or changing one model would shift the other.
ELIGIBILITY_STREAM = 0
DROPOUT_STREAM = 1

_POSITIVE_FLOATS = ("compute_gflops", "memory_mb", "uplink_mbps", "downlink_mbps")
_POSITIVE_INTS = ("lora_rank", "batch_size")
_CONDITIONS = (("needs_charging", "p_charging"), ("needs_idle", "p_idle"), ("needs_unmetered", "p_unmetered"))
_REQUIRED = (
    *_POSITIVE_FLOATS,
    *_POSITIVE_INTS,
    "energy_j_per_step",
    "dropout_prob",
    "diurnal",
    *(need for need, _ in _CONDITIONS),
)
FIELDS: frozenset[str] = frozenset((*_REQUIRED, *(p for _, p in _CONDITIONS)))
_NOT_A_FIELD = f"is not a profile field (known: {', '.join(sorted(FIELDS))})"


@dataclass(frozen=True)
class DeviceProfile:
    """One hardware tier of one device class, validated (see `devices.toml` for the units).

    The `p_*` patterns are None when the matching `needs_*` condition is off and the catalogue
    gave none: an unused condition is not modelled.
    """

    device_class: str
    tier: str
    compute_gflops: float
    memory_mb: float
    lora_rank: int
    batch_size: int
    uplink_mbps: float
    downlink_mbps: float
    energy_j_per_step: float
    dropout_prob: float
    diurnal: tuple[float, ...]
    needs_charging: bool
    needs_idle: bool
    needs_unmetered: bool
    p_charging: tuple[float, ...] | None = None
    p_idle: tuple[float, ...] | None = None
    p_unmetered: tuple[float, ...] | None = None
    task: str = ""  # the task the class runs, as the catalogue names it (federation.tasks resolves it)

    @property
    def name(self) -> str:
        """`class/tier`, the way scenarios and metrics name a profile."""
        return f"{self.device_class}/{self.tier}"


def _refuse(where: str, field: str, problem: str) -> FedgeError:
    return FedgeError(f"device profile {where}: field `{field}` {problem}; fix it in the device catalogue")


def _number(where: str, field: str, value: object) -> float:
    # TOML booleans are Python ints: `true` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(where, field, f"must be a finite number, got {value!r}")
    return float(value)


def _probability(where: str, field: str, value: object) -> float:
    p = _number(where, field, value)
    if not 0.0 <= p <= 1.0:
        raise _refuse(where, field, f"is a probability and must lie in [0, 1], got {value!r}")
    return p


def _hourly(where: str, field: str, value: object) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != HOURS:
        got = f"{len(value)} values" if isinstance(value, list) else repr(value)
        raise _refuse(where, field, f"must be a list of {HOURS} hourly probabilities (hour 0..23), got {got}")
    return tuple(_probability(where, f"{field}[{hour}]", v) for hour, v in enumerate(value))


def parse_profile(
    device_class: str, tier: str, fields: Mapping[str, Any], max_rank: int = 8
) -> DeviceProfile:
    """Validate one tier's fields (class defaults already merged in) into a `DeviceProfile`.

    Refuses, naming class, tier and field: unknown or missing keys, a LoRA rank that is not a
    positive integer or exceeds `max_rank` (the model's r_max), non-positive compute, memory,
    batch or bandwidth, negative energy, probabilities outside [0, 1], hourly patterns that are
    not 24 values, and non-boolean `needs_*` flags.
    """
    where = f"{device_class}/{tier}"
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise _refuse(where, unknown[0], _NOT_A_FIELD)
    missing = [key for key in _REQUIRED if key not in fields]
    if missing:
        raise _refuse(where, missing[0], "is missing")
    values: dict[str, Any] = {}
    for key in _POSITIVE_FLOATS:
        values[key] = _number(where, key, fields[key])
        if values[key] <= 0:
            raise _refuse(where, key, f"must be > 0, got {fields[key]!r}")
    for key in _POSITIVE_INTS:
        raw = fields[key]
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise _refuse(where, key, f"must be a positive integer, got {raw!r}")
        values[key] = raw
    if values["lora_rank"] > max_rank:
        raise _refuse(where, "lora_rank", f"is {values['lora_rank']}, above the model's r_max = {max_rank}")
    values["energy_j_per_step"] = _number(where, "energy_j_per_step", fields["energy_j_per_step"])
    if values["energy_j_per_step"] < 0:
        raise _refuse(where, "energy_j_per_step", f"must be >= 0, got {fields['energy_j_per_step']!r}")
    values["dropout_prob"] = _probability(where, "dropout_prob", fields["dropout_prob"])
    values["diurnal"] = _hourly(where, "diurnal", fields["diurnal"])
    for need, pattern in _CONDITIONS:
        if not isinstance(fields[need], bool):
            raise _refuse(where, need, f"must be true or false, got {fields[need]!r}")
        values[need] = fields[need]
        if pattern in fields:
            values[pattern] = _hourly(where, pattern, fields[pattern])
        elif fields[need]:
            raise _refuse(where, pattern, f"is missing but `{need}` is true")
    return DeviceProfile(device_class=device_class, tier=tier, **values)


def load_catalogue(path: Path | None = None, max_rank: int = 8) -> dict[tuple[str, str], DeviceProfile]:
    """Load and validate a device catalogue (default: `devices.toml` beside this module).

    Layout: `[CLASS]` holds class-wide defaults for any profile field, `[CLASS.tiers.TIER]`
    the tier's own fields (overriding the defaults). Returns `{(class, tier): profile}`.
    `max_rank` is the model's r_max: a tier may not train a wider LoRA than the model has.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise FedgeError(f"max_rank must be a positive integer, got {max_rank!r}")
    path = CATALOGUE_PATH if path is None else Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedgeError(f"device catalogue {path} does not exist: pass an existing TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedgeError(f"device catalogue {path} is not valid TOML ({exc}): fix its syntax") from None
    if not raw:
        raise FedgeError(f"device catalogue {path} defines no device class: add e.g. [phone.tiers.low]")
    return parse_catalogue(raw, str(path), max_rank)


def parse_catalogue(
    raw: Mapping[str, Any], path: str, max_rank: int = 8
) -> dict[tuple[str, str], DeviceProfile]:
    """Validate catalogue tables (`{class: {"task": ..., field: ..., "tiers": {tier: {...}}}}`, as
    TOML gives them) into profiles; `path` names where they came from in every refusal."""
    catalogue: dict[tuple[str, str], DeviceProfile] = {}
    for device_class, table in raw.items():
        if not isinstance(table, dict):
            raise FedgeError(f"device catalogue {path}: `{device_class}` must be a table [{device_class}]")
        defaults = {key: value for key, value in table.items() if key not in ("tiers", "task")}
        unknown = sorted(set(defaults) - FIELDS)
        if unknown:
            refusal = _refuse(f"{device_class} (class defaults)", unknown[0], _NOT_A_FIELD)
            raise FedgeError(f"{path}: {refusal}")
        tiers = table.get("tiers")
        if not isinstance(tiers, dict) or not tiers:
            raise FedgeError(
                f"device catalogue {path}: class `{device_class}` has no tiers: "
                f"add [{device_class}.tiers.NAME]"
            )
        task = table.get("task")
        if not isinstance(task, str) or not task.strip():
            raise FedgeError(
                f"device catalogue {path}: class `{device_class}` must name the task it runs, "
                f'e.g. task = "phone" in [{device_class}]'
            )
        for tier, tier_fields in tiers.items():
            if not isinstance(tier_fields, dict):
                raise FedgeError(f"device catalogue {path}: `{device_class}.tiers.{tier}` must be a table")
            if "task" in tier_fields:
                raise FedgeError(
                    f"device catalogue {path}: `task` belongs to the class [{device_class}], "
                    f"not to its tier {tier}: every tier of a class runs the same task"
                )
            try:
                profile = parse_profile(device_class, tier, {**defaults, **tier_fields}, max_rank)
                catalogue[(device_class, tier)] = replace(profile, task=task.strip())
            except FedgeError as exc:
                # Name the file too: a scenario may point at its own catalogue.
                raise FedgeError(f"{path}: {exc}") from None
    return catalogue


@functools.lru_cache(maxsize=1)
def builtin_catalogue() -> dict[tuple[str, str], DeviceProfile]:
    """`devices.toml` beside this module, loaded once per process (do not mutate the dict)."""
    return load_catalogue()


_added: dict[tuple[str, str], DeviceProfile] = {}  # classes that scenario files added, this process
_in_force: dict[tuple[str, str], DeviceProfile] = {}


def default_catalogue() -> dict[tuple[str, str], DeviceProfile]:
    """The catalogue in force: the built-in `devices.toml` plus the classes that scenario files
    loaded in this process added (`add_classes`). Do not mutate the dict."""
    if not _in_force:
        _in_force.update(builtin_catalogue())
        _in_force.update(_added)
    return _in_force


def add_classes(profiles: Mapping[tuple[str, str], DeviceProfile], source: str) -> None:
    """Put device classes a scenario file defines into the catalogue in force.

    A class may be added again with the very same profiles (the same file loaded twice); a class
    that is already defined differently (a built-in one, or another file's) is refused: one name,
    one device, in every process of a run."""
    current = default_catalogue()
    for device_class in dict.fromkeys(cls for cls, _ in profiles):
        mine = {k: v for k, v in profiles.items() if k[0] == device_class}
        theirs = {k: v for k, v in current.items() if k[0] == device_class}
        if theirs and theirs != mine:
            raise FedgeError(
                f"{source} defines device class `{device_class}`, which the catalogue already has with "
                "other tiers or profiles: give the new class its own name"
            )
    _added.update(profiles)
    current.update(profiles)


def class_tiers(
    device_class: str, catalogue: Mapping[tuple[str, str], DeviceProfile] | None = None
) -> list[str]:
    """The tiers of a device class, in catalogue order (empty for an unknown class)."""
    catalogue = default_catalogue() if catalogue is None else catalogue
    return [tier for cls, tier in catalogue if cls == device_class]


def top_tier(device_class: str, catalogue: Mapping[tuple[str, str], DeviceProfile] | None = None) -> str:
    """The class's most capable tier: largest LoRA rank, then compute, then memory."""
    catalogue = default_catalogue() if catalogue is None else catalogue
    tiers = class_tiers(device_class, catalogue)
    if not tiers:
        known = sorted({cls for cls, _ in catalogue})
        raise FedgeError(f"device class {device_class!r} is not in the device catalogue: use one of {known}")

    def capability(tier: str) -> tuple[int, float, float]:
        p = catalogue[(device_class, tier)]
        return p.lora_rank, p.compute_gflops, p.memory_mb

    return max(tiers, key=capability)


def class_task(device_class: str, catalogue: Mapping[tuple[str, str], DeviceProfile] | None = None) -> str:
    """The task a device class runs, as its catalogue entry names it."""
    catalogue = default_catalogue() if catalogue is None else catalogue
    tiers = class_tiers(device_class, catalogue)
    if not tiers:
        known = sorted({cls for cls, _ in catalogue})
        raise FedgeError(f"device class {device_class!r} is not in the device catalogue: use one of {known}")
    return catalogue[(device_class, tiers[0])].task


def device_classes(catalogue: Mapping[tuple[str, str], DeviceProfile] | None = None) -> list[str]:
    """The catalogue's device classes, in catalogue order."""
    catalogue = default_catalogue() if catalogue is None else catalogue
    return list(dict.fromkeys(cls for cls, _ in catalogue))


def _hour_index(hour: float) -> int:
    if not math.isfinite(hour):
        raise ValueError(f"hour must be finite, got {hour!r}")
    # Simulated time runs past midnight; the pattern repeats daily.
    return math.floor(hour) % HOURS


def eligibility_prob(profile: DeviceProfile, hour: float) -> float:
    """Probability that the device is online and meets its eligibility conditions at `hour`.

    The conditions are drawn independently (an assumption; see `devices.toml`), so this is the
    product of the online probability and each required condition's probability at that hour.
    """
    h = _hour_index(hour)
    p = profile.diurnal[h]
    for need, pattern in _CONDITIONS:
        hourly = getattr(profile, pattern)
        if getattr(profile, need) and hourly is not None:
            p *= hourly[h]
    return p


def is_eligible(profile: DeviceProfile, hour: float, rng: np.random.Generator) -> bool:
    """Draw whether the device may be sampled at `hour` (online and, as required, charging/idle/unmetered).

    Always consumes four uniforms, whatever the profile needs, so that a stream's later draws
    do not depend on which conditions a profile has. `u < p` with u in [0, 1) makes a
    probability of 0 never eligible and 1 always.
    """
    h = _hour_index(hour)
    u = rng.random(1 + len(_CONDITIONS))
    if u[0] >= profile.diurnal[h]:
        return False
    for draw, (need, pattern) in zip(u[1:], _CONDITIONS, strict=True):
        hourly = getattr(profile, pattern)
        if getattr(profile, need) and hourly is not None and draw >= hourly[h]:
            return False
    return True


def drops_out(profile: DeviceProfile, rng: np.random.Generator) -> bool:
    """Draw whether the device vanishes mid-round (its `dropout_prob`)."""
    return bool(rng.random() < profile.dropout_prob)


def device_rng(
    seed: int, device_index: int, round_idx: int, stream: int = ELIGIBILITY_STREAM
) -> np.random.Generator:
    """The generator for one device in one round: a pure function of its four arguments.

    numpy's SeedSequence hashes the whole tuple, so neighbouring devices or rounds get
    unrelated streams (NumPy docs, "Parallel random number generation").
    """
    parts = (seed, device_index, round_idx, stream)
    if any(isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 0 for p in parts):
        raise ValueError(
            f"seed, device_index, round_idx and stream must be non-negative integers, got {parts}"
        )
    return np.random.default_rng([int(p) for p in parts])


class FleetProfiles:
    """A scenario's fleet as counts per (class, tier), mapping a device index to its profile lazily.

    Devices are numbered in blocks, in the order the counts were given. Memory is one entry per
    tier, not per device, so 10,000 registered devices cost what 100 do.
    """

    __slots__ = ("_ends", "blocks")

    def __init__(self, blocks: Sequence[tuple[DeviceProfile, int]]) -> None:
        self.blocks: tuple[tuple[DeviceProfile, int], ...] = tuple(blocks)
        self._ends: list[int] = list(itertools.accumulate(n for _, n in self.blocks))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def profile(self, index: int) -> DeviceProfile:
        """The profile of device `index` (0 <= index < len(self))."""
        if not 0 <= index < len(self):
            raise IndexError(f"device index {index} outside a fleet of {len(self)}")
        return self.blocks[bisect.bisect_right(self._ends, index)][0]

    def counts(self) -> dict[str, int]:
        """`{"class/tier": count}`, for logs and metrics."""
        return {profile.name: n for profile, n in self.blocks}


def fleet_profiles(
    catalogue: Mapping[tuple[str, str], DeviceProfile],
    counts: Mapping[str, int] | Mapping[tuple[str, str], int],
) -> FleetProfiles:
    """A `FleetProfiles` from counts keyed by `"class/tier"` or `(class, tier)`; refuses unknown tiers."""
    blocks: list[tuple[DeviceProfile, int]] = []
    for key, n in counts.items():
        device_class, _, tier = key.partition("/") if isinstance(key, str) else (key[0], "/", key[1])
        profile = catalogue.get((device_class, tier))
        if profile is None:
            known = ", ".join(f"{c}/{t}" for c, t in catalogue)
            raise FedgeError(f"fleet names unknown device `{key}`: use one of {known}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FedgeError(f"fleet count for `{key}` must be a non-negative integer, got {n!r}")
        if n:
            blocks.append((profile, n))
    return FleetProfiles(blocks)
