"""The simulated round clock (federation/clock.py): times, energy, deadline, over-selection, dropouts."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest

from federation import clock, devices
from federation.devices import DeviceProfile

# Profiles defined here, not read from devices.toml, so that editing the catalogue's numbers
# cannot change the fixed-seed expectations below.
_COMMON = {
    "memory_mb": 256.0,
    "diurnal": (1.0,) * 24,
    "needs_charging": False,
    "needs_idle": False,
    "needs_unmetered": False,
}
SLOW = DeviceProfile(
    device_class="sensor",
    tier="slow",
    compute_gflops=1.0,
    lora_rank=2,
    batch_size=8,
    uplink_mbps=0.25,
    downlink_mbps=0.5,
    energy_j_per_step=0.1,
    dropout_prob=0.12,
    **_COMMON,
)
MID = DeviceProfile(
    device_class="phone",
    tier="mid",
    compute_gflops=25.0,
    lora_rank=4,
    batch_size=8,
    uplink_mbps=12.0,
    downlink_mbps=40.0,
    energy_j_per_step=1.8,
    dropout_prob=0.08,
    **_COMMON,
)
FAST = DeviceProfile(
    device_class="tv",
    tier="high",
    compute_gflops=30.0,
    lora_rank=8,
    batch_size=16,
    uplink_mbps=20.0,
    downlink_mbps=100.0,
    energy_j_per_step=3.7,
    dropout_prob=0.03,
    **_COMMON,
)


def test_round_time_is_download_plus_compute_plus_upload() -> None:
    t = clock.device_round_time(
        MID, download_bytes=5_000_000, upload_bytes=1_500_000, steps=10, flops_per_step=5e9
    )
    assert t["download_s"] == pytest.approx(5e6 * 8 / 40e6)  # 1.0 s
    assert t["compute_s"] == pytest.approx(10 * 5e9 / 25e9)  # 2.0 s
    assert t["upload_s"] == pytest.approx(1.5e6 * 8 / 12e6)  # 1.0 s
    assert t["total_s"] == pytest.approx(4.0)
    zero = clock.device_round_time(MID, 0, 0, 0, 0.0)
    assert zero["total_s"] == 0.0
    with pytest.raises(ValueError):
        clock.device_round_time(MID, -1, 0, 1, 1.0)


def test_energy_full_and_partial() -> None:
    assert clock.energy_j(MID, 10) == pytest.approx(18.0)
    t = clock.device_round_time(MID, 5_000_000, 1_500_000, 10, 5e9)  # download 1 s, compute 2 s
    assert clock.energy_until(MID, t, 10, stop_s=0.5) == 0.0  # still downloading
    assert clock.energy_until(MID, t, 10, stop_s=2.0) == pytest.approx(9.0)  # half the steps
    assert clock.energy_until(MID, t, 10, stop_s=99.0) == pytest.approx(18.0)
    with pytest.raises(ValueError):
        clock.energy_j(MID, -1)


def test_over_select_count() -> None:
    assert clock.over_select_count(100) == 130  # not 131: 100 * 1.3 is 130.00000000000003
    assert clock.over_select_count(10) == 13
    assert clock.over_select_count(7) == 10  # ceil(9.1)
    assert clock.over_select_count(100, available=120) == 120
    assert clock.over_select_count(0) == 0
    with pytest.raises(ValueError):
        clock.over_select_count(10, factor=0.9)


def test_select_over_by_hand() -> None:
    sampled = ["a", "b", "c", "d", "e", "f", "g"]
    finish = [5.0, 1.0, 3.0, 12.0, 2.0, 3.0, math.inf]
    dropped = [False, False, True, False, False, False, True]
    kept, stragglers, gone = clock.select_over(sampled, finish, dropped, target=3, deadline_s=10.0)
    # in time and alive, by finish time: b (1), e (2), f (3), a (5); c finished at 3 but dropped
    assert kept == [1, 4, 5]
    assert stragglers == [0, 3]  # a: in time but after the target was met; d: past the deadline
    assert gone == [2, 6]
    sel = clock.Selection(kept, stragglers, gone)
    assert clock.round_end_s(finish, sel, target=3, deadline_s=10.0) == 3.0  # closes at the 3rd report
    # a tight deadline: fewer than target, the round lasts until the deadline
    kept, stragglers, gone = clock.select_over(sampled, finish, dropped, target=3, deadline_s=2.5)
    assert kept == [1, 4] and stragglers == [0, 3, 5] and gone == [2, 6]
    assert clock.round_end_s(finish, clock.Selection(kept, stragglers, gone), 3, 2.5) == 2.5
    # ties go to the lower position
    assert clock.select_over([0, 1, 2], [1.0, 1.0, 1.0], [False] * 3, 2, 5.0).kept == [0, 1]
    with pytest.raises(ValueError):
        clock.select_over(sampled, finish[:-1], dropped, 3, 10.0)


class _Round(NamedTuple):
    selection: clock.Selection
    account: clock.RoundAccount
    finish: list[float]
    dropped: list[bool]


def _simulate(seed: int, round_idx: int, target: int, deadline_s: float) -> _Round:
    """One round over a 300-device fleet, everything drawn from (seed, device, round)."""
    fleet = [SLOW, MID, FAST] * 100
    steps, down, up = 20, 2_000_000, 500_000
    flops = {"slow": 0.12e9, "mid": 11e9, "high": 22e9}
    pick = np.random.default_rng([seed, round_idx, 99])  # the server's sampling stream
    n = clock.over_select_count(target, available=len(fleet))
    sampled = sorted(pick.choice(len(fleet), size=n, replace=False).tolist())
    profiles = [fleet[i] for i in sampled]
    times = [clock.device_round_time(p, down, up, steps, flops[p.tier]) for p in profiles]
    drop_rngs = [devices.device_rng(seed, i, round_idx, devices.DROPOUT_STREAM) for i in sampled]
    dropped = [devices.drops_out(p, r) for p, r in zip(profiles, drop_rngs, strict=True)]
    drop_at = [clock.dropout_time_s(t, r) for t, r in zip(times, drop_rngs, strict=True)]
    finish = [t["total_s"] for t in times]
    selection = clock.select_over(sampled, finish, dropped, target, deadline_s)
    end = clock.round_end_s(finish, selection, target, deadline_s)
    energies = [
        clock.energy_until(p, t, steps, drop_at[k] if dropped[k] else end)
        for k, (p, t) in enumerate(zip(profiles, times, strict=True))
    ]
    account = clock.RoundAccount(round=round_idx, simulated_s=end)
    account.note_eligible("phone", 100)
    account.record_selection([p.device_class for p in profiles], selection, energies, down, up)
    return _Round(selection, account, finish, dropped)


def _check_invariants(r: _Round, target: int, deadline_s: float) -> None:
    sel, account = r.selection, r.account
    assert account.finished + account.dropped + account.stragglers == account.sampled
    for counts in account.per_class.values():
        assert counts.finished + counts.dropped + counts.stragglers == counts.sampled
    assert sorted(sel.kept + sel.stragglers + sel.dropped) == list(range(account.sampled))
    assert len(sel.kept) <= target
    assert all(r.dropped[i] for i in sel.dropped) and not any(r.dropped[i] for i in sel.kept + sel.stragglers)
    assert all(r.finish[i] <= deadline_s for i in sel.kept)
    # the kept are the first to finish: no in-time straggler beat any of them
    in_time_stragglers = [r.finish[i] for i in sel.stragglers if r.finish[i] <= deadline_s]
    if sel.kept and in_time_stragglers:
        assert len(sel.kept) == target and max(r.finish[i] for i in sel.kept) <= min(in_time_stragglers)
    assert account.upload_bytes == 500_000 * account.finished
    assert account.download_bytes == 2_000_000 * account.sampled
    assert account.energy_j == pytest.approx(sum(c.energy_j for c in account.per_class.values()))


def test_fixed_seed_round_accounting() -> None:
    # Device times: phone/mid 0.4 + 8.8 + 0.33 = 9.5 s, tv/high 0.16 + 14.7 + 0.2 = 15.0 s,
    # sensor/slow 32 + 2.4 + 16 = 50.4 s.
    # A 20 s deadline: every sensor that does not drop is a straggler; short of the target,
    # the round runs to its deadline.
    r = _simulate(seed=3, round_idx=1, target=100, deadline_s=20.0)
    _check_invariants(r, 100, 20.0)
    per_class = {k: (c.sampled, c.finished, c.dropped, c.stragglers) for k, c in r.account.per_class.items()}
    assert per_class == {"phone": (43, 36, 7, 0), "sensor": (40, 0, 2, 38), "tv": (47, 47, 0, 0)}
    assert (r.account.sampled, r.account.finished, r.account.dropped, r.account.stragglers) == (
        130,
        83,
        9,
        38,
    )
    assert r.account.simulated_s == 20.0
    # Deterministic: the same seed gives the same round.
    again = _simulate(seed=3, round_idx=1, target=100, deadline_s=20.0)
    assert again.selection == r.selection and again.account.to_dict() == r.account.to_dict()
    # A 120 s deadline and a target of 60 (78 sampled): the round closes at the 60th report,
    # which here is a sensor's; the other 14 are stragglers (ties go to the lower position).
    r = _simulate(seed=3, round_idx=1, target=60, deadline_s=120.0)
    _check_invariants(r, 60, 120.0)
    assert (r.account.sampled, r.account.finished, r.account.dropped, r.account.stragglers) == (78, 60, 4, 14)
    assert r.account.simulated_s == pytest.approx(50.4)


def test_dropouts_match_their_probability_over_rounds() -> None:
    dropped = sampled = 0
    for round_idx in range(40):
        account = _simulate(seed=0, round_idx=round_idx, target=100, deadline_s=60.0).account
        dropped += account.dropped
        sampled += account.sampled
    # fleet mean dropout (0.12 + 0.08 + 0.03) / 3 = 0.0767; 5200 draws: sigma ~ 0.0037
    assert abs(dropped / sampled - 0.23 / 3) < 0.015


def test_round_account_outcomes() -> None:
    account = clock.RoundAccount(round=0)
    account.note_sampled("phone", 10)
    account.note_outcome("phone", "finished", 1.5, upload_bytes=4)
    account.note_sampled("tv", 10)
    account.note_outcome("tv", "straggler", 2.0, upload_bytes=4)  # a straggler's upload is discarded
    record = account.to_dict()
    assert record["per_class"]["phone"] == {
        "eligible": 0,
        "sampled": 1,
        "finished": 1,
        "dropped": 0,
        "stragglers": 0,
        "energy_j": 1.5,
    }
    assert record["upload_bytes"] == 4 and record["download_bytes"] == 20 and record["energy_j"] == 3.5
    with pytest.raises(ValueError):
        account.note_outcome("tv", "lost", 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one outcome"):
        account.record_selection(["tv", "tv"], clock.Selection([0], [], []), [0.0, 0.0])
