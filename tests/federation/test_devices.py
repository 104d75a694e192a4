"""The device catalogue (federation/devices.toml + devices.py): loading, refusals, availability, fleets."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation import devices
from federation.devices import DeviceProfile, load_catalogue
from federation.errors import FedgeError

HOURLY = "[" + ", ".join(["0.5"] * 24) + "]"

# A minimal valid catalogue; each malformed variant below changes one line of it.
BASE = f"""
[phone]
task = "phone"
needs_charging = true
needs_idle = false
needs_unmetered = false
diurnal = {HOURLY}
p_charging = {HOURLY}

[phone.tiers.low]
compute_gflops = 5.0
memory_mb = 256
lora_rank = 2
batch_size = 4
uplink_mbps = 3.0
downlink_mbps = 10.0
energy_j_per_step = 2.0
dropout_prob = 0.1
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _replace(line_start: str, new_line: str | None) -> str:
    """BASE with the line starting `line_start` replaced by `new_line` (None: removed)."""
    lines = BASE.splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.startswith(line_start)]
    if new_line is None:
        del lines[index]
    else:
        lines[index] = new_line
    return "\n".join(lines) + "\n"


def _profile(**overrides: Any) -> DeviceProfile:
    fields: dict[str, Any] = {
        "device_class": "phone",
        "tier": "t",
        "compute_gflops": 5.0,
        "memory_mb": 256.0,
        "lora_rank": 2,
        "batch_size": 4,
        "uplink_mbps": 3.0,
        "downlink_mbps": 10.0,
        "energy_j_per_step": 1.0,
        "dropout_prob": 0.1,
        "diurnal": (0.5,) * 24,
        "needs_charging": False,
        "needs_idle": False,
        "needs_unmetered": False,
    }
    fields.update(overrides)
    return DeviceProfile(**fields)


# --- the shipped catalogue ----------------------------------------------------------------------


def test_shipped_catalogue_loads_with_every_class_and_tier() -> None:
    catalogue = load_catalogue()
    assert set(catalogue) == {
        ("phone", "low"),
        ("phone", "mid"),
        ("phone", "high"),
        ("sensor", "low"),
        ("sensor", "high"),
        ("tv", "mid"),
        ("tv", "high"),
    }
    for (device_class, tier), profile in catalogue.items():
        assert (profile.device_class, profile.tier) == (device_class, tier)
        assert profile.lora_rank in (2, 4, 8)
        assert len(profile.diurnal) == 24
        for need, pattern in (("needs_charging", "p_charging"), ("needs_idle", "p_idle")):
            if getattr(profile, need):
                assert getattr(profile, pattern) is not None
    # tiers are ordered: a higher tier is faster, has more memory and a rank at least as large
    for device_class, tiers in (
        ("phone", ("low", "mid", "high")),
        ("sensor", ("low", "high")),
        ("tv", ("mid", "high")),
    ):
        profiles = [catalogue[(device_class, t)] for t in tiers]
        for lower, higher in itertools.pairwise(profiles):
            assert higher.compute_gflops > lower.compute_gflops
            assert higher.memory_mb > lower.memory_mb
            assert higher.lora_rank >= lower.lora_rank
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalogue[("phone", "low")].lora_rank = 8  # type: ignore[misc]


def test_shipped_catalogue_refuses_a_model_with_a_smaller_r_max() -> None:
    with pytest.raises(FedgeError, match=r"phone/high: field `lora_rank` is 8, above the model's r_max = 4"):
        load_catalogue(max_rank=4)


def test_class_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    text = (
        BASE
        + "\n[phone.tiers.high]\n"
        + "\n".join(
            line for line in BASE.split("[phone.tiers.low]")[1].strip().splitlines() if "dropout" not in line
        )
    )
    text = text.replace("[phone]\n", "[phone]\ndropout_prob = 0.2\n", 1)
    catalogue = load_catalogue(_write(tmp_path, text))
    assert catalogue[("phone", "low")].dropout_prob == 0.1  # the tier's own value wins
    assert catalogue[("phone", "high")].dropout_prob == 0.2  # inherited from [phone]
    assert catalogue[("phone", "low")].p_idle is None  # not needed, not given


# --- refusals -----------------------------------------------------------------------------------

MALFORMED = [
    ("rank above r_max", "lora_rank =", "lora_rank = 16", "lora_rank"),
    ("rank zero", "lora_rank =", "lora_rank = 0", "lora_rank"),
    ("rank negative", "lora_rank =", "lora_rank = -2", "lora_rank"),
    ("rank fractional", "lora_rank =", "lora_rank = 2.5", "lora_rank"),
    ("rank boolean", "lora_rank =", "lora_rank = true", "lora_rank"),
    ("batch zero", "batch_size =", "batch_size = 0", "batch_size"),
    ("negative uplink", "uplink_mbps =", "uplink_mbps = -1.0", "uplink_mbps"),
    ("zero downlink", "downlink_mbps =", "downlink_mbps = 0", "downlink_mbps"),
    ("bandwidth as text", "downlink_mbps =", 'downlink_mbps = "fast"', "downlink_mbps"),
    ("zero compute", "compute_gflops =", "compute_gflops = 0.0", "compute_gflops"),
    ("zero memory", "memory_mb =", "memory_mb = 0", "memory_mb"),
    ("negative energy", "energy_j_per_step =", "energy_j_per_step = -0.5", "energy_j_per_step"),
    ("dropout above 1", "dropout_prob =", "dropout_prob = 1.5", "dropout_prob"),
    ("dropout below 0", "dropout_prob =", "dropout_prob = -0.1", "dropout_prob"),
    ("dropout nan", "dropout_prob =", "dropout_prob = nan", "dropout_prob"),
    ("diurnal 23 values", "diurnal =", "diurnal = [" + ", ".join(["0.5"] * 23) + "]", "diurnal"),
    ("diurnal scalar", "diurnal =", "diurnal = 0.5", "diurnal"),
    ("diurnal value above 1", "diurnal =", "diurnal = [1.2" + ", 0.5" * 23 + "]", "diurnal[0]"),
    ("charging pattern negative", "p_charging =", "p_charging = [0.5" + ", -0.5" * 23 + "]", "p_charging[1]"),
    ("charging needed, pattern missing", "p_charging =", None, "p_charging"),
    ("need not boolean", "needs_idle =", "needs_idle = 1", "needs_idle"),
    ("missing key", "compute_gflops =", None, "compute_gflops"),
    ("missing need", "needs_unmetered =", None, "needs_unmetered"),
    ("unknown tier key", "dropout_prob =", "dropout_prob = 0.1\ncolour = 'red'", "colour"),
    ("unknown class key", "needs_idle =", "needs_idle = false\nlorarank = 4", "lorarank"),
]


@pytest.mark.parametrize(("what", "line", "new", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_profile_is_refused_naming_class_tier_and_field(
    tmp_path: Path, what: str, line: str, new: str | None, field: str
) -> None:
    path = _write(tmp_path, _replace(line, new))
    with pytest.raises(FedgeError) as info:
        load_catalogue(path)
    message = str(info.value)
    assert f"`{field}`" in message, message
    assert "phone" in message, message
    if what != "unknown class key":  # a class-level key is refused before any tier is read
        assert "phone/low" in message, message
    assert "\n" not in message


def test_broken_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match="does not exist"):
        load_catalogue(tmp_path / "missing.toml")
    with pytest.raises(FedgeError, match="not valid TOML"):
        load_catalogue(_write(tmp_path, "[phone\n"))
    with pytest.raises(FedgeError, match="no tiers"):
        load_catalogue(_write(tmp_path, "[phone]\nneeds_idle = true\n"))
    with pytest.raises(FedgeError, match="defines no device class"):
        load_catalogue(_write(tmp_path, ""))
    with pytest.raises(FedgeError, match="max_rank"):
        load_catalogue(max_rank=0)


# --- availability -------------------------------------------------------------------------------


def test_zero_probability_hours_are_never_eligible() -> None:
    diurnal = tuple(0.0 if h == 3 else 1.0 for h in range(24))
    charging = tuple(0.0 if h == 10 else 1.0 for h in range(24))
    profile = _profile(diurnal=diurnal, needs_charging=True, p_charging=charging)
    rng = np.random.default_rng(0)
    for hour in (3.0, 3.99, 27.5, 10.2, 34.0):  # 27.5 and 34.0 wrap to 3 h and 10 h
        assert devices.eligibility_prob(profile, hour) == 0.0
        assert not any(devices.is_eligible(profile, hour, rng) for _ in range(3000))
    # probability 1 everywhere needed: always eligible
    assert all(devices.is_eligible(profile, 12.0, rng) for _ in range(3000))


def test_unneeded_conditions_are_ignored() -> None:
    never_charging = (0.0,) * 24
    profile = _profile(diurnal=(1.0,) * 24, needs_charging=False, p_charging=never_charging)
    rng = np.random.default_rng(1)
    assert devices.eligibility_prob(profile, 5) == 1.0
    assert all(devices.is_eligible(profile, 5, rng) for _ in range(1000))


def test_eligibility_frequency_matches_its_probability() -> None:
    hourly = tuple(0.2 + 0.03 * h for h in range(24))
    profile = _profile(
        diurnal=hourly, needs_charging=True, p_charging=(0.8,) * 24, needs_idle=True, p_idle=(0.5,) * 24
    )
    for hour in (0, 13, 23):
        p = devices.eligibility_prob(profile, hour)
        assert p == pytest.approx(hourly[hour] * 0.8 * 0.5)
        n = 20000
        hits = sum(devices.is_eligible(profile, hour + 0.5, devices.device_rng(1, i, hour)) for i in range(n))
        assert abs(hits / n - p) < 4 * (p * (1 - p) / n) ** 0.5


def test_device_draws_depend_only_on_seed_device_round_and_stream() -> None:
    a = devices.device_rng(7, 42, 3).random(4)
    assert np.array_equal(a, devices.device_rng(7, 42, 3).random(4))
    assert not np.array_equal(a, devices.device_rng(7, 42, 4).random(4))
    assert not np.array_equal(a, devices.device_rng(7, 43, 3).random(4))
    assert not np.array_equal(a, devices.device_rng(7, 42, 3, devices.DROPOUT_STREAM).random(4))
    with pytest.raises(ValueError):
        devices.device_rng(-1, 0, 0)
    always, never = _profile(dropout_prob=1.0), _profile(dropout_prob=0.0)
    rng = np.random.default_rng(0)
    assert all(devices.drops_out(always, rng) for _ in range(100))
    assert not any(devices.drops_out(never, rng) for _ in range(100))


# --- fleets -------------------------------------------------------------------------------------


def test_fleet_maps_indices_to_profiles_lazily() -> None:
    catalogue = load_catalogue()
    fleet = devices.fleet_profiles(
        catalogue, {"phone/low": 6000, ("tv", "high"): 3999, "sensor/high": 1, "tv/mid": 0}
    )
    assert len(fleet) == 10000
    assert fleet.profile(0).name == "phone/low" and fleet.profile(5999).name == "phone/low"
    assert fleet.profile(6000).name == "tv/high" and fleet.profile(9998).name == "tv/high"
    assert fleet.profile(9999).name == "sensor/high"
    assert fleet.counts() == {"phone/low": 6000, "tv/high": 3999, "sensor/high": 1}
    assert len(fleet.blocks) == 3  # one entry per tier, none per device
    with pytest.raises(IndexError):
        fleet.profile(10000)
    with pytest.raises(FedgeError, match="unknown device `phone/ultra`"):
        devices.fleet_profiles(catalogue, {"phone/ultra": 1})
    with pytest.raises(FedgeError, match="non-negative integer"):
        devices.fleet_profiles(catalogue, {"phone/low": -1})
