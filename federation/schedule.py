"""Who takes part in a simulated round, and what the round costs on a simulated clock.

Cross-device rounds as production systems run them (Bonawitz et al., "Towards Federated
Learning at Scale", SysML 2019): only *eligible* devices (online, and for phones charging, idle
and on an unmetered network, by the simulated hour) can be sampled; the server over-selects
(130% of the target per class), keeps the first reports to arrive before the round's deadline,
and drops stragglers and devices that vanish mid-round. Each sampled device's time is download +
compute + upload from its profile and the actual bytes and steps; energy is accounted per device.

Pure functions of (candidates, hour, seed, round): the same inputs give the same round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from federation.clock import (
    OVER_SELECTION,
    RoundAccount,
    Selection,
    device_round_time,
    dropout_time_s,
    energy_j,
    energy_until,
    over_select_count,
    round_end_s,
    select_over,
)
from federation.data.common import stable_seed
from federation.devices import (
    DROPOUT_STREAM,
    ELIGIBILITY_STREAM,
    DeviceProfile,
    device_rng,
    drops_out,
    is_eligible,
)

DAY_S = 24 * 3600


@dataclass(frozen=True)
class Candidate:
    """A registered device the server may sample this round."""

    node: int  # the server's handle (a Flower node id)
    device_class: str
    profile: DeviceProfile
    index: int  # stable device index: its random draws depend on it, not on the node id
    download_bytes: int
    upload_bytes: int
    steps: int
    # FLOPs of one training example of the device's task (`TaskInfo.flops_per_example`)
    flops_per_example: float


@dataclass
class RoundPlan:
    """The devices whose updates the round keeps, and the round's simulated account."""

    kept: list[int]  # node handles, to run for real
    account: RoundAccount
    duration_s: float


def hour_of(sim_time_s: float) -> float:
    return (sim_time_s % DAY_S) / 3600.0


def device_index(device_class: str, data_client: str) -> int:
    """A stable non-negative index for a device (its per-round draws are keyed on it)."""
    return stable_seed("device-index", device_class, data_client) % 2**31


def plan_round(
    candidates: Sequence[Candidate],
    targets: Mapping[str, int],
    sim_time_s: float,
    seed: int,
    server_round: int,
    deadline_s: float,
    factor: float = OVER_SELECTION,
) -> RoundPlan:
    """Eligibility, over-selection, clock and outcomes of one round, per device class."""
    account = RoundAccount(server_round)
    hour = hour_of(sim_time_s)
    kept: list[int] = []
    duration = 0.0
    for device_class, target in targets.items():
        pool = [c for c in candidates if c.device_class == device_class]
        eligible = [
            c
            for c in pool
            if is_eligible(c.profile, hour, device_rng(seed, c.index, server_round, ELIGIBILITY_STREAM))
        ]
        account.note_eligible(device_class, len(eligible))
        if not eligible or target <= 0:
            continue
        rng = np.random.default_rng(stable_seed("over-select", seed, server_round, device_class))
        n = over_select_count(target, len(eligible), factor)
        sampled = [eligible[int(i)] for i in sorted(rng.choice(len(eligible), size=n, replace=False))]
        times = [
            device_round_time(
                c.profile,
                c.download_bytes,
                c.upload_bytes,
                c.steps,
                c.flops_per_example * c.profile.batch_size,
            )
            for c in sampled
        ]
        drop_rngs = [device_rng(seed, c.index, server_round, DROPOUT_STREAM) for c in sampled]
        dropped = [drops_out(c.profile, r) for c, r in zip(sampled, drop_rngs, strict=True)]
        finish = [t["total_s"] for t in times]
        selection: Selection = select_over(sampled, finish, dropped, target, deadline_s)
        end = round_end_s(finish, selection, target, deadline_s)
        duration = max(duration, end)
        energies = []
        for i, (c, t) in enumerate(zip(sampled, times, strict=True)):
            if i in selection.kept:
                energies.append(energy_j(c.profile, c.steps))
            elif i in selection.dropped:
                energies.append(energy_until(c.profile, t, c.steps, dropout_time_s(t, drop_rngs[i])))
            else:
                energies.append(energy_until(c.profile, t, c.steps, end))
        account.record_selection(
            [device_class] * len(sampled),
            selection,
            energies,
            [c.download_bytes for c in sampled],
            [c.upload_bytes for c in sampled],
        )
        kept.extend(sampled[i].node for i in selection.kept)
    account.simulated_s = duration
    return RoundPlan(kept, account, duration)
