"""One training round, typed: what the plain and the secure path return, and one line of
`metrics.jsonl` (docs/metrics.md), which is serialised from these types and nothing else.

Both paths (`server.loop.RunState.train_round`'s plain round, `server.secagg.secure_train_round`)
return a `RoundResult`; neither touches the global state: the server loop alone applies
`aggregate` through the run's aggregation rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundResult:
    """What one training round produced."""

    secure: bool  # the server learned the round's updates only as sums (secure aggregation)
    sampled: int  # devices the round asked to train
    participants: dict[str, int]  # device class -> devices whose update is in the aggregate
    failures: int  # devices that failed or never answered the training request
    rejected: int  # replies refused by a check (a malformed or hostile update, a bad key or share)
    upload_bytes: int  # bytes the devices uploaded (secure: packed masked vectors + sealed shares)
    download_bytes: int  # bytes of global state sent to the devices
    train_loss: dict[str, float]  # task -> mean local training loss of the devices that reported one
    # The aggregation rule's state after every accepted upload (or decoded secure sum) was
    # added: keys `task/key`. Not serialised: it is the round's update itself.
    aggregate: Any = field(repr=False)
    vanished: int = 0  # secure: devices that sent keys but no masked vector
    aborted: list[str] = field(default_factory=list)  # secure: tasks whose sum was not applied
    secagg_stage_seconds: dict[str, float] = field(default_factory=dict)  # secure: wall time per exchange
    clock: dict[str, Any] | None = None  # the simulated device clock's account (device-clock)
    train_wall_seconds: float = 0.0
    clipped: int = 0  # plain rounds with max-update-norm: updates the server scaled down to the bound
    # distributed DP: the accountant's entry for this round (docs/privacy.md); None when DP is off
    privacy: dict[str, Any] | None = None
    # distributed DP: the private sums applied this round (federation.privacy.accountant.Release),
    # what the accountant charges; not serialised
    dp_releases: list[Any] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The training fields of a metrics.jsonl line (everything but `aggregate`)."""
        out: dict[str, Any] = {
            "secure": self.secure,
            "sampled": self.sampled,
            "participants": dict(self.participants),
            "failures": self.failures,
            "rejected": self.rejected,
            "upload_bytes": self.upload_bytes,
            "download_bytes": self.download_bytes,
            "train_loss": dict(self.train_loss),
            "vanished": self.vanished,
            "aborted": list(self.aborted),
            "secagg_stage_seconds": dict(self.secagg_stage_seconds),
            "train_wall_seconds": self.train_wall_seconds,
        }
        if self.clock is not None:
            out["clock"] = self.clock
        if self.clipped:
            out["clipped"] = self.clipped
        if self.privacy is not None:
            out["privacy"] = self.privacy
        return out


@dataclass
class MetricsEntry:
    """One line of metrics.jsonl: round 0 (the starting model, `devices` set) or a training round
    (`train` set)."""

    round: int
    eval: dict[str, dict[str, float]]  # task -> metrics on the central held-out set (server-side)
    federated: dict[str, dict[str, float]]  # task -> metrics summed over devices' held-out data
    wall_seconds: float  # the whole round, evaluation included
    train: RoundResult | None = None
    devices: dict[str, int] | None = None  # round 0: device class -> devices checked in

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round}
        if self.train is not None:
            out.update(self.train.to_json())
        out.update({"eval": self.eval, "federated": self.federated, "wall_seconds": self.wall_seconds})
        if self.devices is not None:
            out["devices"] = self.devices
        return out
