"""The served model: an exponential moving average of the global states, round over round.

With few devices a round, the global state after a round leans toward the devices that round
drew (the smart-home watches: 3-8 of 16 a night, each holding 3-5 of the 7 exercises), so the
held-out metric of the latest state swings from round to round although the model as a whole
has stopped improving. Averaging the iterates (Polyak & Juditsky, "Acceleration of Stochastic
Approximation by Averaging", SIAM J. Control Optim. 1992; stochastic weight averaging,
Izmailov et al., UAI 2018, and its use on a federated server, Caldarola et al., "Improving
Generalization in Federated Learning by Seeking Flat Minima", ECCV 2022) keeps the part the
rounds agree on and damps the part each draw adds. Unlike a smaller server step or server
momentum, training itself is untouched: devices train from the latest state, and only what the
server evaluates, sends to devices for evaluation and exports is the average.

    served_1 = state_1,    served_t = decay x served_{t-1} + (1 - decay) x state_t

(the pretrained start is not averaged in: it would hold the served model back for the first
rounds). decay 0 serves the latest state. The average is a function of global states alone:
post-processing, so it costs no privacy and secure aggregation is unchanged.

It is an average of *models* only where the model is linear in the averaged state: LoRA with a
frozen shared A (``B A`` is linear in B), heads, merged residuals. Where a rule trains both
factors (FedIT, HetLoRA) the average of B and of A is the same approximation those rules make
across devices; where a rule rebuilds its factors from an SVD each round (FlexLoRA) the factors'
signs and bases change between rounds and their average is not a model between them, so such
a rule declares `state_averages = False` and the run config refuses the combination.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.checkpoint import split_prefixed

SERVED_PREFIX = "served/"
"""Checkpoint keys of the served average (after the global state's and the server optimizer's)."""


def check_decay(decay: float) -> str | None:
    """Why `decay` is not a valid moving-average decay, or None."""
    if not isinstance(decay, int | float) or isinstance(decay, bool) or not 0.0 <= float(decay) < 1.0:
        return f"must lie in [0, 1) (0: serve the latest state), got {decay!r}"
    return None


def update(
    served: Mapping[str, np.ndarray] | None, state: Mapping[str, np.ndarray], decay: float
) -> dict[str, np.ndarray]:
    """The served average after a round whose global state is `state` (float64 arithmetic, the
    state's dtypes). `served` None (the first trained round) or decay 0: a copy of `state`."""
    if (why := check_decay(decay)) is not None:
        raise ValueError(f"served-average decay {why}")
    if served is None or decay == 0.0:
        return {k: np.array(v, copy=True) for k, v in state.items()}
    if set(served) != set(state):
        differ = sorted(set(served) ^ set(state))
        raise ValueError(f"the served average and the state hold different keys: {', '.join(differ[:3])}")
    out = {}
    for key, new in state.items():
        old = served[key]
        if old.shape != new.shape:
            raise ValueError(f"served average {key}: shape {old.shape}, the state's {new.shape}")
        mixed = decay * np.asarray(old, dtype=np.float64) + (1.0 - decay) * np.asarray(new, dtype=np.float64)
        out[key] = mixed.astype(np.asarray(new).dtype)
    return out


def split_served(
    checkpoint: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A checkpoint's arrays as (the rest, the served average without its prefix, or None)."""
    rest, served = split_prefixed(checkpoint, SERVED_PREFIX)
    return rest, served or None
