"""Learning-rate decay over a run: cosine from the configured rates to `final` x them.

With data that differ from device to device, FedAvg at a constant local learning rate does not
converge to the optimum but keeps moving around it, each round toward the devices it drew; a
decaying learning rate is necessary for it to converge (Li, Huang, Yang, Wang & Zhang, "On the
Convergence of FedAvg on Non-IID Data", ICLR 2020, Theorem 1 and Section 3.3). fedge's watches
show it: each records 3-5 of the 7 exercises and the night lets 3-8 of them train a round, so at
a constant rate the sensor model swings with the round's draw until the last round.

The schedule is cosine annealing (Loshchilov & Hutter, "SGDR", ICLR 2017) without restarts,
over the run's rounds: a device trains round t of T at

    factor(t) = final + (1 - final) x (1 + cos(pi x (t - 1) / (T - 1))) / 2

times its learning rates (the LoRA matrices' `lr` and the heads' `head-lr`; a TV viewer's
private fit keeps `private-lr`), constant within the round: 1 in round 1, `final` in round T.
A model trained in one call instead (the centralized and local-only references) follows the
same curve over its steps. `final` 1 keeps the rates constant (the default).
"""

from __future__ import annotations

import math


def check_final(final: object) -> str | None:
    """Why `final` is not a valid final fraction of the learning rates, or None."""
    if isinstance(final, bool) or not isinstance(final, int | float) or not 0.0 < float(final) <= 1.0:
        return f"must lie in (0, 1] (1: constant learning rates), got {final!r}"
    return None


def cosine(progress: float, final: float) -> float:
    """The factor at `progress` (0: the start, 1: the end; clamped to [0, 1])."""
    if (why := check_final(final)) is not None:
        raise ValueError(f"lr-final {why}")
    p = min(max(float(progress), 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))


def round_factor(server_round: int, rounds: int, final: float) -> float:
    """The factor of round `server_round` (1-based) of a run of `rounds` rounds: 1 in the first,
    `final` in the last and any after it (a run resumed for more rounds stays at `final`); a
    one-round run has nothing to decay over (1)."""
    if server_round < 1 or rounds < 1:
        raise ValueError(f"round {server_round} of {rounds}: rounds count from 1")
    return cosine((server_round - 1) / (rounds - 1) if rounds > 1 else 0.0, final)


def step_factor(step: int, steps: int, final: float) -> float:
    """The factor of step `step` (0-based) of `steps` trained in one call (one step: 1)."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} of {steps}")
    return cosine(step / (steps - 1) if steps > 1 else 0.0, final)
