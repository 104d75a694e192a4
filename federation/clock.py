"""The simulated round clock: per-device round times, energy, over-selection, round accounting.

Each sampled device downloads the global state, trains, and uploads, one after the other, as
in FedScale's client model (Lai et al., "FedScale: Benchmarking Model and System Performance of
Federated Learning at Scale", ICML 2022: completion time = compute + communication from the
client's traced speed and bandwidth). The server over-selects, sampling ~130% of the devices it
needs, keeps the first `target` to report before the round's deadline and discards the rest,
as Google's production system does (Bonawitz et al., "Towards Federated Learning at Scale:
System Design", SysML 2019, which also reports 6-10% mid-round dropout).

Pure functions of their arguments: the caller supplies bytes, steps, FLOPs and the per-device
draws (`federation.devices.device_rng`), so a fixed seed gives a fixed round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple, TypedDict

import numpy as np

from federation.devices import DeviceProfile

# Bonawitz et al. 2019 select 130% of the target number of devices.
OVER_SELECTION = 1.3

Outcome = Literal["finished", "dropped", "straggler"]


class RoundTime(TypedDict):
    """Seconds one device spends in a round, by phase."""

    download_s: float
    compute_s: float
    upload_s: float
    total_s: float


def _transfer_s(n_bytes: float, mbps: float) -> float:
    # Ookla-style megabits: 1e6 bit/s. Per-connection latency (tens of ms) is left out: it is
    # small next to the seconds a LoRA transfer takes on these links.
    return n_bytes * 8.0 / (mbps * 1e6)


def device_round_time(
    profile: DeviceProfile, download_bytes: float, upload_bytes: float, steps: int, flops_per_step: float
) -> RoundTime:
    """Download, compute and upload seconds of one device for one round, and their sum.

    `flops_per_step` is the FLOPs of one local step at the device's own batch and rank (the
    caller knows the model); compute runs at the profile's sustained `compute_gflops`.
    """
    if download_bytes < 0 or upload_bytes < 0 or steps < 0 or flops_per_step < 0:
        raise ValueError(
            "bytes, steps and flops_per_step must be >= 0, got "
            f"{download_bytes=}, {upload_bytes=}, {steps=}, {flops_per_step=}"
        )
    download_s = _transfer_s(download_bytes, profile.downlink_mbps)
    compute_s = steps * flops_per_step / (profile.compute_gflops * 1e9)
    upload_s = _transfer_s(upload_bytes, profile.uplink_mbps)
    return RoundTime(
        download_s=download_s,
        compute_s=compute_s,
        upload_s=upload_s,
        total_s=download_s + compute_s + upload_s,
    )


def energy_j(profile: DeviceProfile, steps: float) -> float:
    """Joules a device spends on `steps` local training steps (radio energy is not modelled)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps * profile.energy_j_per_step


def energy_until(profile: DeviceProfile, times: RoundTime, steps: int, stop_s: float) -> float:
    """Joules spent by `stop_s` seconds into the round: training that was cut short costs its part.

    Used for stragglers (told to stop when the round closes) and dropouts (gone at some point):
    compute starts after the download and progresses linearly through `steps`.
    """
    if times["compute_s"] <= 0:
        done = 1.0 if stop_s >= times["download_s"] else 0.0
    else:
        done = min(max((stop_s - times["download_s"]) / times["compute_s"], 0.0), 1.0)
    return energy_j(profile, steps * done)


def dropout_time_s(times: RoundTime, rng: np.random.Generator) -> float:
    """When a dropping device vanishes: uniform over its round (assumption; no trace says better)."""
    return float(rng.random()) * times["total_s"]


def over_select_count(target: int, available: int | None = None, factor: float = OVER_SELECTION) -> int:
    """How many devices to sample for `target` reports: ceil(factor x target), capped by `available`."""
    if target < 0 or factor < 1:
        raise ValueError(f"target must be >= 0 and factor >= 1, got {target=}, {factor=}")
    # round() first: 100 * 1.3 is 130.00000000000003 in binary floating point.
    n = math.ceil(round(target * factor, 9))
    return n if available is None else min(n, available)


class Selection(NamedTuple):
    """Positions in the sampled list: kept (by finish time), stragglers and dropped (ascending)."""

    kept: list[int]
    stragglers: list[int]
    dropped: list[int]


def select_over(
    sampled: Sequence[Any],
    finish_times: Sequence[float],
    dropped: Sequence[bool],
    target: int,
    deadline_s: float,
) -> Selection:
    """Over-selection: keep the first `target` non-dropped devices to finish by `deadline_s`.

    A device that dropped mid-round is counted as dropped, whatever its finish time says. Every
    other device not kept is a straggler: it finished after the deadline, or in time but after
    the round had its `target` reports (the server then tells it to stop, as in Bonawitz et al.
    2019). Ties in finish time go to the lower position so the result is deterministic.
    So kept + stragglers + dropped partition `range(len(sampled))`.
    """
    n = len(sampled)
    if len(finish_times) != n or len(dropped) != n:
        raise ValueError(
            f"sampled, finish_times and dropped differ in length: {n}, {len(finish_times)}, {len(dropped)}"
        )
    if target < 0 or not deadline_s > 0:
        raise ValueError(f"target must be >= 0 and deadline_s > 0, got {target=}, {deadline_s=}")
    gone = [i for i in range(n) if dropped[i]]
    alive = [i for i in range(n) if not dropped[i]]
    in_time = sorted((i for i in alive if finish_times[i] <= deadline_s), key=lambda i: (finish_times[i], i))
    kept = in_time[:target]
    kept_set = set(kept)
    stragglers = [i for i in alive if i not in kept_set]
    return Selection(kept=kept, stragglers=stragglers, dropped=gone)


def round_end_s(finish_times: Sequence[float], selection: Selection, target: int, deadline_s: float) -> float:
    """Simulated seconds the round lasts: until the `target`-th report, else the deadline.

    The server cannot tell a device that vanished from a slow one, so a round short of its
    target waits out the deadline (conservative assumption).
    """
    if target > 0 and len(selection.kept) >= target:
        return max(finish_times[i] for i in selection.kept)
    return deadline_s


@dataclass
class ClassCounts:
    """One device class's share of a round."""

    eligible: int = 0
    sampled: int = 0
    finished: int = 0
    dropped: int = 0
    stragglers: int = 0
    energy_j: float = 0.0


@dataclass
class RoundAccount:
    """What one simulated round cost and who took part, overall and per device class.

    Invariant once every sampled device has an outcome: finished + dropped + stragglers ==
    sampled, overall and per class. Upload bytes count only kept reports (what the server
    aggregates); download bytes count every sampled device (all received the global state).
    """

    round: int
    eligible: int = 0
    sampled: int = 0
    finished: int = 0
    dropped: int = 0
    stragglers: int = 0
    download_bytes: int = 0
    upload_bytes: int = 0
    simulated_s: float = 0.0
    energy_j: float = 0.0
    per_class: dict[str, ClassCounts] = field(default_factory=dict)

    def _cls(self, device_class: str) -> ClassCounts:
        return self.per_class.setdefault(device_class, ClassCounts())

    def note_eligible(self, device_class: str, n: int = 1) -> None:
        """Count `n` devices of `device_class` eligible at the round's start."""
        self.eligible += n
        self._cls(device_class).eligible += n

    def note_sampled(self, device_class: str, download_bytes: int = 0) -> None:
        """Count one sampled device and the global state it downloaded."""
        self.sampled += 1
        self.download_bytes += download_bytes
        self._cls(device_class).sampled += 1

    def note_outcome(self, device_class: str, outcome: Outcome, energy: float, upload_bytes: int = 0) -> None:
        """Count one sampled device's outcome and the energy it spent (uploads count only if finished)."""
        counts = self._cls(device_class)
        if outcome == "finished":
            self.finished += 1
            counts.finished += 1
            self.upload_bytes += upload_bytes
        elif outcome == "dropped":
            self.dropped += 1
            counts.dropped += 1
        elif outcome == "straggler":
            self.stragglers += 1
            counts.stragglers += 1
        else:
            raise ValueError(f"outcome must be finished, dropped or straggler, got {outcome!r}")
        self.energy_j += energy
        counts.energy_j += energy

    def record_selection(
        self,
        classes: Sequence[str],
        selection: Selection,
        energies: Sequence[float],
        download_bytes: Sequence[int] | int = 0,
        upload_bytes: Sequence[int] | int = 0,
    ) -> None:
        """Count every sampled device (position i: class `classes[i]`, energy `energies[i]`)."""
        n = len(classes)
        down = [download_bytes] * n if isinstance(download_bytes, int) else list(download_bytes)
        up = [upload_bytes] * n if isinstance(upload_bytes, int) else list(upload_bytes)
        if not len(energies) == len(down) == len(up) == n:
            raise ValueError("classes, energies and byte counts must have one entry per sampled device")
        outcomes: dict[int, Outcome] = {i: "finished" for i in selection.kept}
        outcomes.update({i: "straggler" for i in selection.stragglers})
        outcomes.update({i: "dropped" for i in selection.dropped})
        if sorted(outcomes) != list(range(n)):
            raise ValueError("the selection must give every sampled device exactly one outcome")
        for i in range(n):
            self.note_sampled(classes[i], down[i])
            self.note_outcome(classes[i], outcomes[i], energies[i], up[i])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for one line of metrics.jsonl."""
        return asdict(self)
