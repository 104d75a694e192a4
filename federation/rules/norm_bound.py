"""The server's L2 norm bound on plain updates (run setting `max-update-norm`; not a rule).

Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?", 2019: bounding
the L2 norm of each update the server receives limits what one boosted ("model-replacement")
update can do, while honest updates, which are small, pass unchanged. fedge **clips**: an update
whose delta is longer than the bound is scaled down to it (its direction kept), so an honest
device with an unusually large step still counts, and a hostile one moves the mean by at most
bound x (its weight / the round's total weight). Where the bound applies: plain rounds only,
before the update is folded into any rule. Under secure aggregation the server never sees one
update; there the device clips (DP's `dp-clip`, the per-coordinate `secagg-clip`) and the server
checks the decoded sum (`federation.secagg.vector.check_plausible_sum`).

The delta's norm is read through the rule's declared layout: value slots hold weight x delta
(weight 1 for the unweighted rules), and the device's weight is the largest entry of its weights
slots; weights slots are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.rules.base import Slot


def update_norm(upload: Mapping[str, np.ndarray], layout: Mapping[str, Slot]) -> float:
    """L2 norm of the device's delta (value slots divided by its weight)."""
    weight = max(
        (float(np.max(upload[k])) for k, slot in layout.items() if slot.weights and np.size(upload[k])),
        default=1.0,
    )
    if not weight > 0:
        return 0.0
    total = sum(
        float(np.sum(np.asarray(upload[k], dtype=np.float64) ** 2))
        for k, slot in layout.items()
        if not slot.weights
    )
    return float(np.sqrt(total)) / weight


def clip_update(
    upload: Mapping[str, np.ndarray], layout: Mapping[str, Slot], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """(the upload with its delta scaled to L2 norm <= bound, the delta's norm before).

    bound <= 0 disables the bound (the upload is returned as is)."""
    norm = update_norm(upload, layout)
    if bound <= 0 or norm <= bound:
        return dict(upload), norm
    factor = bound / norm
    out = {
        k: (np.asarray(v) if layout[k].weights else (np.asarray(v) * factor).astype(np.asarray(v).dtype))
        for k, v in upload.items()
    }
    return out, norm
