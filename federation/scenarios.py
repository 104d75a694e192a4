"""Named scenarios: which fleet, how many devices per round, how long.

A scenario is data. `fleet` counts devices per class; partition ids of a Flower simulation are
mapped onto the fleet interleaved (phone, tv, sensor, phone, ...) so that any prefix of the
nodes is a mixed fleet. Which real data client (Shakespeare role, MovieLens viewer, watch
subject) each device holds is drawn from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from federation.errors import FedgeError

DEVICE_TASK: dict[str, str] = {"phone": "phone", "tv": "tv", "sensor": "sensor"}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    fleet: dict[str, int]  # device class -> devices registered
    per_round: dict[str, int]  # device class -> devices sampled each round
    rounds: int
    # local training steps per round by device class: a watch's tiny CNN step costs ~1/50 of
    # a phone's MiniLM step, so a sensor can afford more of them in the same budget
    local_steps: dict[str, int]
    # caps on the server-side held-out evaluation per task (sequences / windows), drawn by seed
    eval_cap: dict[str, int] = field(default_factory=lambda: {"phone": 1024, "sensor": 100_000})

    @property
    def size(self) -> int:
        return sum(self.fleet.values())

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in ("phone", "tv", "sensor") if any(DEVICE_TASK[c] == t for c in self.fleet))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="smart-home",
            description="a mixed home fleet: 16 phones, 12 TVs, 8 watches; 12 devices per round",
            fleet={"phone": 16, "tv": 12, "sensor": 8},
            per_round={"phone": 4, "tv": 4, "sensor": 4},
            rounds=12,
            local_steps={"phone": 10, "tv": 10, "sensor": 30},
        ),
        Scenario(
            name="bench",
            description="fedge bench overhead: 10 devices, all of them every round",
            fleet={"phone": 4, "tv": 3, "sensor": 3},
            per_round={"phone": 4, "tv": 3, "sensor": 3},
            rounds=3,
            local_steps={"phone": 10, "tv": 10, "sensor": 30},
            eval_cap={"phone": 64, "sensor": 100_000},
        ),
        Scenario(
            name="smoke",
            description="a quick check of the whole pipeline: 8 devices, 2 rounds",
            fleet={"phone": 3, "tv": 3, "sensor": 2},
            per_round={"phone": 2, "tv": 2, "sensor": 2},
            rounds=2,
            local_steps={"phone": 6, "tv": 6, "sensor": 20},
            eval_cap={"phone": 256, "sensor": 100_000},
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise FedgeError(f"unknown scenario {name!r}: choose one of {', '.join(sorted(SCENARIOS))}") from None


def fleet_order(scenario: Scenario) -> list[tuple[str, int]]:
    """(device class, index within class) for each partition id, classes interleaved."""
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
