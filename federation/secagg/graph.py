"""SecAgg+ sparse communication graph (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020).

SecAgg (Bonawitz et al., CCS 2017) has every client mask with, and secret-share to, every other
client: O(n) keys, shares and PRG expansions per client. SecAgg+ replaces the complete graph by
a random k-regular graph with k = O(log n): a client agrees keys with, masks against and shares
its secrets among its k neighbours only, and the server still learns nothing but the sum provided
the graph restricted to honest surviving clients stays connected and no client has `threshold`
colluding neighbours.

Construction: a Harary graph H(k, n) - each client joined to its floor(k/2) nearest positions on
each side of a ring, plus the diametric chord when k is odd - laid on a pseudorandom ordering of
the clients. The ordering sorts ids by HMAC-SHA256 under a key derived (HKDF) from the round's
public `seed`, so every party computes the same graph, and which clients are adjacent is
independent of who is corrupt or drops out. The seed must not be chosen adversarially after
seeing who colludes (derive it from the run id and round, or from public randomness): a server
grinding seeds is outside the honest-but-curious model.

Security/dropout trade-off (k = degree, t = threshold, delta = dropout rate, gamma = colluding
fraction). Each client's secrets are shared t-out-of-k among its neighbours.
- Privacy needs fewer than t colluding neighbours per client (larger t is safer) and the honest
  survivors to stay connected (larger k is safer); a Harary ring splits only if two runs of
  floor(k/2) consecutive positions are all dropped or corrupt, probability <= C(n,2) rho^(2 floor(k/2)),
  rho = delta + gamma.
- Completion needs at least t surviving neighbours per client (smaller t, larger k help).
- Against a server that lies about who dropped, t > k/2 is necessary but not sufficient by itself:
  the device-side checks of `protocol.check_survivors` (a device reveals only if it is itself a
  survivor and at least t of its own neighbours are) bound what one device reveals to k - t < t
  pairwise seeds, and the consistency check under certified keys (`pki`) stops inconsistent
  survivor lists; docs/secure-aggregation.md states what holds with and without it.
Larger k costs O(k) key agreements, shares and mask expansions per client.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .context import pack_fields

__all__ = ["neighbours", "recommended_degree", "recommended_threshold"]


def _ordering_key(seed: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=pack_fields("graph-order")).derive(seed)


def _rank(key: bytes, client_id: int) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(struct.pack(">Q", client_id))
    return h.finalize()


def neighbours(client_ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Symmetric neighbour sets of a pseudorandom Harary graph, deterministic in (set of ids, seed).

    Every client gets exactly `degree` neighbours, except that for odd degree and an odd number
    of clients one client gets degree + 1 (no odd-degree regular graph exists on an odd vertex
    count). degree >= n - 1 gives the complete graph, i.e. Bonawitz et al.'s SecAgg.
    """
    ids = list(client_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2**64:
            raise ValueError(f"client ids must be integers in [0, 2**64), got {i!r}")
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    n = len(ids)
    if degree >= n - 1:
        everyone = frozenset(ids)
        return {i: everyone - {i} for i in ids}
    key = _ordering_key(bytes(seed))
    # Sorting by a keyed PRF value is a uniformly random permutation (ties have probability ~2^-256);
    # sorting ids first makes the result independent of the order the caller listed them in.
    ring = sorted(sorted(ids), key=lambda i: _rank(key, i))
    adj: dict[int, set[int]] = {i: set() for i in ids}

    def link(a: int, b: int) -> None:
        adj[ring[a % n]].add(ring[b % n])
        adj[ring[b % n]].add(ring[a % n])

    for pos in range(n):
        for step in range(1, degree // 2 + 1):
            link(pos, pos + step)
    if degree % 2:
        half = (n + 1) // 2
        for pos in range(half):  # n even: a perfect matching; n odd: ring[0] gets one extra edge
            link(pos, pos + half)
    return {i: frozenset(adj[i]) for i in ids}


def recommended_threshold(degree: int, *, fraction: float = 0.5) -> int:
    """Shamir threshold t = floor(fraction * degree) + 1 for secrets shared among `degree` neighbours.

    The default (a strict majority) is the Bonawitz/Bell choice; a smaller fraction tolerates
    more dropouts but fewer colluders.
    """
    if degree < 1:
        raise ValueError(f"degree must be >= 1 to share secrets, got {degree}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    return min(degree, math.floor(fraction * degree) + 1)


def _log2_tail(k: int, p: float, a: int) -> float:
    """log2 P[Binomial(k, p) >= a], computed in log space (no overflow for any k)."""
    if a <= 0:
        return 0.0
    if a > k or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    logs = [
        math.lgamma(k + 1)
        - math.lgamma(i + 1)
        - math.lgamma(k - i + 1)
        + i * math.log(p)
        + (k - i) * math.log1p(-p)
        for i in range(a, k + 1)
    ]
    top = max(logs)
    return (top + math.log(sum(math.exp(v - top) for v in logs))) / math.log(2)


def recommended_degree(
    n: int,
    *,
    dropout_rate: float = 0.3,
    corrupt_rate: float = 0.05,
    security_bits: int = 40,
    abort_bits: int = 10,
    threshold_fraction: float = 0.5,
) -> int:
    """Smallest degree k for n clients meeting three union bounds (Bell et al.'s analysis, concretely):

    - privacy, graph:     C(n,2) * (dropout_rate + corrupt_rate)^(2 floor(k/2)) <= 2^-security_bits
    - privacy, collusion: n * P[Bin(k, corrupt_rate) >= t]                      <= 2^-security_bits
    - completion:         n * P[Bin(k, dropout_rate) > k - t]                   <= 2^-abort_bits
    with t = recommended_threshold(k, fraction=threshold_fraction). The bounds decay
    exponentially in k and grow with log n, so k = O(log n + security_bits). Capped at n - 1:
    the complete graph (SecAgg), the best any degree can do. E.g. with the defaults
    k = n - 1 up to n = 100 (30% dropout dominates), k = 113 at n = 200 and 131 at n = 1000.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (0 <= dropout_rate < 1 and 0 <= corrupt_rate < 1 and dropout_rate + corrupt_rate < 1):
        raise ValueError("dropout_rate and corrupt_rate must be in [0, 1) with sum below 1")
    if not corrupt_rate < threshold_fraction < 1 - dropout_rate:
        raise ValueError(
            f"threshold_fraction={threshold_fraction} must lie strictly between corrupt_rate="
            f"{corrupt_rate} and 1 - dropout_rate={1 - dropout_rate}, otherwise no degree is secure and live"
        )
    rho = dropout_rate + corrupt_rate
    log2_pairs = math.log2(math.comb(n, 2)) if n >= 2 else 0.0
    log2_n = math.log2(n)
    for k in range(1, n - 1):
        t = recommended_threshold(k, fraction=threshold_fraction)
        graph_ok = rho == 0 or log2_pairs + 2 * (k // 2) * math.log2(rho) <= -security_bits
        collusion_ok = log2_n + _log2_tail(k, corrupt_rate, t) <= -security_bits
        live_ok = log2_n + _log2_tail(k, dropout_rate, k - t + 1) <= -abort_bits
        if graph_ok and collusion_ok and live_ok:
            return k
    return max(n - 1, 0)
