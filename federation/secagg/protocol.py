"""One round of secure aggregation, as pure device and server steps (no Flower here).

SecAgg+ (Bell et al., CCS 2020) over a sparse neighbour graph, with the dropout recovery of
SecAgg (Bonawitz et al., CCS 2017). Three server<->device exchanges per round, the first one
carrying the training; a fourth, light one (Bonawitz's ConsistencyCheck) when devices hold
certified keys (`pki`):

1. **keys** — the server sends each sampled device the global state and the round's public
   parameters. The device checks every parameter against what it knows itself (`check_params`:
   its run, task, clip, bits, weight bound, group size >= secagg-min-devices, a degree no
   smaller than the recommended one, t >= floor(k/2) + 1, the exact no-wrap modulus), trains,
   keeps its contribution, draws two X25519 key pairs (`c`: to seal shares, `s`: pairwise
   masks) and a self-mask seed `b`, and replies with its two public keys (signed with its
   certified key when there is a PKI).
2. **mask** — the server sends each device its neighbours' public keys (with their signatures).
   The device refuses keys of non-neighbours, duplicate keys, invalid or low-order keys and (with
   a PKI) keys not signed by a distinct certified device; it splits `b` into t-out-of-k Shamir
   shares, seals one per neighbour with AES-GCM (key from X25519 on the `c` keys; associated
   data: run, round, sender, receiver), derives one pairwise seed per neighbour from the `s`
   keys, and replies with the sealed shares and y = x + PRG(b) + sum_{j>i} PRG(s_ij) -
   sum_{j<i} PRG(s_ij) (mod 2^m).
3. *(with a PKI)* **check** — the server sends each survivor the survivor set S; the device
   checks it (below) and signs it.
4. **unmask** — the server sends S (and the signatures on it). A device reveals, for every
   neighbour it masked with, either its share of that neighbour's `b` (neighbour in S) or their
   pairwise seed (neighbour not in S) - never both, and only once per round - and only if it
   is itself in S, every id in S is a member, and at least t of its own neighbours are in S
   (with a PKI: and at least t of them signed exactly this S). The server rebuilds each
   survivor's `b` from t shares, removes the self masks and the pairwise masks shared with the
   vanished, and decodes the sum.

Why these checks suffice (the argument is in docs/secure-aggregation.md, "Malicious server").
For the server to strip u's masks it needs b_u (t shares) and s_uv for every neighbour v; an
honest v gives either its b_u share or s_uv, so the shares of honest v whose seed is known must
come from u revealing s_uv, which u does for at most k - t neighbours (< t). Without signatures
a server that sends *different* S to different devices can still learn the sum of a small set
of honest devices (two neighbours whose masks cancel); with them, every honest neighbour that
gives a share of b_u signed an S containing u, and u reveals seeds only for an S that t of its
neighbours signed, so the server learns nothing about u beyond the sum of u and at least
t - c of its honest neighbours (c: colluding neighbours), as in Bonawitz et al.'s Theorem.

Device ids inside the protocol are 1..n, the positions of the round's members (Flower node ids
are 64-bit and only the server needs them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from federation.secagg import pki
from federation.secagg.context import pack_fields, round_context, share_aad
from federation.secagg.envelope import TamperedShareError, open_, seal
from federation.secagg.graph import neighbours, recommended_degree, recommended_threshold
from federation.secagg.masking import agree, check_masked_vector, masked_input, unmask_sum
from federation.secagg.quantize import MAX_MODULUS_BITS, MAX_VALUE_BITS, modulus_bits
from federation.secagg.shamir import combine, split

PLANNED_DROPOUT = 0.3  # dropout rate the graph degree is planned for (recommended_degree)
MAX_GROUP = 1 << 20  # protocol ids are 1..n; a larger "group" is a malformed or hostile request
GRAPH_SEED_BYTES = 32


class SecAggAbort(RuntimeError):
    """The round cannot complete securely; nothing is revealed. `blame`: protocol ids at fault
    (empty when no device is: too few survivors, an honest dropout)."""

    def __init__(self, message: str, blame: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.blame = tuple(blame)


class ParameterError(ValueError):
    """A device refuses the round: its public parameters or a list the server sent are unsafe."""


def weight_bits(max_weight: int) -> int:
    """Bits of the largest weight: every weight w <= max_weight is below 2^weight_bits."""
    return max(1, int(max_weight).bit_length())


def required_modulus_bits(value_bits: int, n: int, max_weight: int) -> int:
    """The no-wrap modulus of a group of n devices (`quantize.modulus_bits`)."""
    return modulus_bits(value_bits, n, weight_bits(max_weight))


@functools.lru_cache(maxsize=256)
def minimum_degree(n: int, dropout_rate: float = PLANNED_DROPOUT) -> int:
    """The smallest neighbour count a device accepts in a group of n (the recommended degree)."""
    return 1 if n <= 2 else max(1, min(recommended_degree(n, dropout_rate=dropout_rate), n - 1))


@dataclass(frozen=True)
class Params:
    """The public parameters of one group's round, sent to every member in step 1."""

    run_id: int
    server_round: int
    group: str  # the task: each task's devices aggregate their own vector
    n: int  # members, ids 1..n
    degree: int  # neighbours per device (n - 1: complete graph)
    threshold: int  # Shamir t: shares needed to rebuild a survivor's self-mask seed
    graph_seed: bytes
    clip: float
    value_bits: int
    modulus_bits: int
    max_weight: int
    length: int  # coordinates of the masked vector
    # distributed DP (federation/privacy; "none": off). The rotation seed is public, fresh per round.
    dp_mechanism: str = "none"
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 0.0
    dp_rotation_seed: bytes = b""
    dp_length: int = 0  # value coordinates before rotation (the rest of `length` is weights)

    @property
    def dp(self) -> bool:
        return self.dp_mechanism != "none"

    def dp_plan(self):  # -> federation.privacy.encoding.DpPlan
        """The round's DP plan (both sides compute it from these public parameters)."""
        from federation.privacy.encoding import plan_dp

        return plan_dp(self.dp_mechanism, self.dp_noise_multiplier, self.dp_clip, self.value_bits, self.n,
                       self.dp_length)  # fmt: skip

    def context(self, stage: str) -> bytes:
        return round_context(self.run_id, self.server_round, f"{self.group}:{stage}")

    @functools.cached_property
    def _graph(self) -> dict[int, frozenset[int]]:
        return neighbours(list(range(1, self.n + 1)), self.degree, self.graph_seed)

    def graph(self) -> dict[int, frozenset[int]]:
        """The round's neighbour graph, built once per parameters object (the server asks per
        device and stage)."""
        return self._graph

    def to_config(self) -> dict[str, int | float | str | bytes]:
        return {
            "sa-run": self.run_id,
            "sa-round": self.server_round,
            "sa-group": self.group,
            "sa-n": self.n,
            "sa-degree": self.degree,
            "sa-threshold": self.threshold,
            "sa-graph-seed": self.graph_seed,
            "sa-clip": self.clip,
            "sa-value-bits": self.value_bits,
            "sa-modulus-bits": self.modulus_bits,
            "sa-max-weight": self.max_weight,
            "sa-length": self.length,
            "sa-dp-mechanism": self.dp_mechanism,
            "sa-dp-noise-multiplier": self.dp_noise_multiplier,
            "sa-dp-clip": self.dp_clip,
            "sa-dp-rotation-seed": self.dp_rotation_seed,
            "sa-dp-length": self.dp_length,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> Params:
        try:
            return cls(
                run_id=int(cfg["sa-run"]),  # type: ignore[call-overload]
                server_round=int(cfg["sa-round"]),  # type: ignore[call-overload]
                group=str(cfg["sa-group"]),
                n=int(cfg["sa-n"]),  # type: ignore[call-overload]
                degree=int(cfg["sa-degree"]),  # type: ignore[call-overload]
                threshold=int(cfg["sa-threshold"]),  # type: ignore[call-overload]
                graph_seed=bytes(cfg["sa-graph-seed"]),  # type: ignore[arg-type]
                clip=float(cfg["sa-clip"]),  # type: ignore[arg-type]
                value_bits=int(cfg["sa-value-bits"]),  # type: ignore[call-overload]
                modulus_bits=int(cfg["sa-modulus-bits"]),  # type: ignore[call-overload]
                max_weight=int(cfg["sa-max-weight"]),  # type: ignore[call-overload]
                length=int(cfg["sa-length"]),  # type: ignore[call-overload]
                dp_mechanism=str(cfg.get("sa-dp-mechanism", "none")),
                dp_noise_multiplier=float(cfg.get("sa-dp-noise-multiplier", 0.0)),  # type: ignore[arg-type]
                dp_clip=float(cfg.get("sa-dp-clip", 0.0)),  # type: ignore[arg-type]
                dp_rotation_seed=bytes(cfg.get("sa-dp-rotation-seed", b"")),  # type: ignore[arg-type]
                dp_length=int(cfg.get("sa-dp-length", 0)),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ParameterError(f"malformed secure-aggregation parameters: {exc!r}") from None

    def digest(self) -> bytes:
        """Binds a device's session (and every signature) to exactly these parameters."""
        fields = self.to_config()
        return pack_fields(
            *(f"{k}={v!r}" if not isinstance(v, bytes) else v for k, v in sorted(fields.items()))
        )


@dataclass(frozen=True)
class Expected:
    """What a device knows of its round without the server: from its own run config and task."""

    run_id: int
    group: str
    clip: float
    value_bits: int
    max_weight: int
    min_devices: int
    dropout_rate: float = PLANNED_DROPOUT
    dp_mechanism: str = "none"
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 0.0


def check_params(params: Params, expected: Expected) -> None:
    """Refuse (ParameterError) a round whose public parameters a device must not accept.

    A server that could pick them would pick threshold 1 (one neighbour rebuilds a self-mask
    seed), a tiny group (a sum of two reveals each to the other), a sparse graph (fewer honest
    neighbours to hide among) or a modulus that wraps; a device that accepts only what its own
    config implies cannot be downgraded."""
    p, e = params, expected
    problems: list[str] = []
    if p.run_id != e.run_id:
        problems.append(f"run {p.run_id} is not this device's run {e.run_id}")
    if p.group != e.group:
        problems.append(f"group {p.group!r} is not this device's task {e.group!r}")
    if not max(2, e.min_devices) <= p.n <= MAX_GROUP:
        problems.append(f"group size {p.n} is below secagg-min-devices={max(2, e.min_devices)} or absurd")
    else:
        floor = minimum_degree(p.n, e.dropout_rate)
        if not floor <= p.degree <= p.n - 1:
            problems.append(f"degree {p.degree} is outside [{floor}, {p.n - 1}] for a group of {p.n}")
        if not p.degree // 2 + 1 <= p.threshold <= max(p.degree, 1):
            problems.append(f"threshold {p.threshold} is outside [floor(k/2)+1, k] for degree k={p.degree}")
    if (p.clip, p.value_bits, p.max_weight) != (e.clip, e.value_bits, e.max_weight):
        problems.append(
            f"clip/value bits/max weight {p.clip}/{p.value_bits}/{p.max_weight} differ from this "
            f"device's {e.clip}/{e.value_bits}/{e.max_weight}"
        )
    elif (p.dp_mechanism, p.dp_noise_multiplier, p.dp_clip) != (
        e.dp_mechanism,
        e.dp_noise_multiplier,
        e.dp_clip,
    ):
        # a server that could lower the noise or raise the clip would lower every device's privacy
        problems.append(
            f"DP mechanism/noise multiplier/clip {p.dp_mechanism}/{p.dp_noise_multiplier}/{p.dp_clip} differ "
            f"from this device's {e.dp_mechanism}/{e.dp_noise_multiplier}/{e.dp_clip}"
        )
    elif p.dp and (len(p.dp_rotation_seed) != 32 or p.max_weight != 1):
        problems.append("a private round needs a 32-byte rotation seed and weight bound 1")
    elif not problems:
        try:
            m = (
                p.dp_plan().modulus_bits
                if p.dp
                else required_modulus_bits(p.value_bits, p.n, p.max_weight)
            )
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if p.modulus_bits != m:
                problems.append(f"modulus 2^{p.modulus_bits} is not the no-wrap modulus 2^{m} of this group")
    if not 2 <= p.value_bits <= MAX_VALUE_BITS or not 2 <= p.modulus_bits <= MAX_MODULUS_BITS:
        problems.append(f"value bits {p.value_bits} / modulus bits {p.modulus_bits} out of range")
    if len(p.graph_seed) != GRAPH_SEED_BYTES or p.length < 1 or p.server_round < 0:
        problems.append("graph seed, vector length or round is malformed")
    if problems:
        raise ParameterError("refusing secure-aggregation parameters: " + "; ".join(problems))


def plan(
    run_id: int,
    server_round: int,
    group: str,
    n: int,
    length: int,
    *,
    clip: float,
    value_bits: int,
    max_weight: int,
    dropout_rate: float = PLANNED_DROPOUT,
    dp_mechanism: str = "none",
    dp_noise_multiplier: float = 0.0,
    dp_clip: float = 0.0,
    dp_length: int = 0,
) -> Params:
    """The server's public parameters for a group of n devices (graph and rotation seeds fresh per
    round). With a DP mechanism, `length` is the private vector's (rotated values + weights) and
    the modulus is the DP plan's (`federation.privacy.encoding.plan_dp`)."""
    if n < 2:
        raise SecAggAbort(f"secure aggregation needs at least 2 devices in group {group!r}, got {n}")
    degree = minimum_degree(n, dropout_rate)
    threshold = max(1, min(recommended_threshold(degree), degree))
    if dp_mechanism != "none":
        params = Params(
            run_id=run_id, server_round=server_round, group=group, n=n, degree=degree, threshold=threshold,
            graph_seed=os.urandom(GRAPH_SEED_BYTES), clip=clip, value_bits=value_bits, modulus_bits=0,
            max_weight=1, length=length, dp_mechanism=dp_mechanism, dp_noise_multiplier=dp_noise_multiplier,
            dp_clip=dp_clip, dp_rotation_seed=os.urandom(32), dp_length=dp_length,
        )  # fmt: skip
        return dataclasses.replace(params, modulus_bits=params.dp_plan().modulus_bits)
    return Params(
        run_id=run_id,
        server_round=server_round,
        group=group,
        n=n,
        degree=degree,
        threshold=threshold,
        graph_seed=os.urandom(GRAPH_SEED_BYTES),
        clip=clip,
        value_bits=value_bits,
        modulus_bits=required_modulus_bits(value_bits, n, max_weight),
        max_weight=max_weight,
        length=length,
    )


# -- device side ------------------------------------------------------------------------------


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(public: bytes) -> None:
    """ValueError unless `public` is a 32-byte X25519 key with which an agreement succeeds.

    A low-order point (e.g. all zeros) gives an all-zero shared secret, which `cryptography`
    refuses: a trial agreement with a throwaway key finds it before anyone depends on it."""
    data = bytes(public)
    if len(data) != 32:
        raise ValueError(f"an X25519 public key is 32 bytes, got {len(data)}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(data))
    except ValueError:
        raise ValueError("invalid X25519 public key (low-order point: all-zero shared secret)") from None


@dataclass
class DeviceSession:
    """A device's secrets for one round; kept on the device (in its node state), never sent."""

    my_id: int
    params_digest: bytes
    c_private: bytes
    s_private: bytes
    self_seed: bytes
    masked_with: tuple[int, ...] = ()  # neighbours whose pairwise masks are in our vector
    survivors: tuple[int, ...] = ()  # with a PKI: the survivor set this device signed
    revealed: bool = False  # step "unmask" answered: never answer it twice

    def c_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.c_private)

    def s_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.s_private)

    def public_keys(self) -> tuple[bytes, bytes]:
        return _raw_public(self.c_key()), _raw_public(self.s_key())


def device_keys(params: Params, my_id: int, expected: Expected) -> tuple[DeviceSession, bytes, bytes]:
    """Step 1: check the parameters, draw key pairs and the self-mask seed.

    Returns (session, c_public, s_public)."""
    check_params(params, expected)
    if isinstance(my_id, bool) or not 1 <= my_id <= params.n:
        raise ParameterError(f"device id {my_id} outside 1..{params.n}")
    c_key, s_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    session = DeviceSession(my_id, params.digest(), _raw_private(c_key), _raw_private(s_key), os.urandom(32))
    return session, _raw_public(c_key), _raw_public(s_key)


def _check_session(session: DeviceSession, params: Params) -> None:
    if session.params_digest != params.digest():
        raise ParameterError(
            "secure-aggregation message does not belong to this device's round (run/round/group)"
        )


def _share_key(session: DeviceSession, params: Params, peer_c_public: bytes) -> bytes:
    return agree(session.c_key(), peer_c_public, params.context("share-key"))


def check_peer_keys(
    session: DeviceSession,
    params: Params,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    *,
    ca_public: bytes | None = None,
    credentials: Mapping[int, tuple[bytes, bytes]] | None = None,
    my_certificate: bytes | None = None,
) -> dict[int, bytes]:
    """Refuse (ParameterError) neighbours' keys that are not theirs to give.

    Every id must be a neighbour in the round's graph and not us; every key valid (no low-order
    point) and distinct from every other (a key repeated for two neighbours on either side of us
    would cancel our two pairwise masks). With a PKI (`ca_public`), each neighbour's keys must
    be signed, for this round and position, by a device the CA certified, each certified name
    at most once in our neighbourhood and not ours (no Sybils). Returns the neighbours' signing
    keys (empty without a PKI)."""
    _check_session(session, params)
    mine = params.graph()[session.my_id]
    unknown = sorted(set(peer_keys) - mine)
    if unknown:
        raise ParameterError(f"server sent keys of devices {unknown} that are not our neighbours")
    seen = set(session.public_keys())
    for j in sorted(peer_keys):
        for key in peer_keys[j]:
            try:
                check_public_key(key)
            except ValueError as exc:
                raise ParameterError(f"neighbour {j}'s public key is invalid ({exc})") from None
            if bytes(key) in seen:
                raise ParameterError(f"neighbour {j}'s public key repeats another key of this round")
            seen.add(bytes(key))
    if ca_public is None:
        return {}
    if credentials is None or set(credentials) != set(peer_keys) or my_certificate is None:
        raise ParameterError("certified keys are required: the server sent neighbours' keys without them")
    names = {pki.verify_certificate(ca_public, my_certificate)[0]}
    identities: dict[int, bytes] = {}
    for j in sorted(peer_keys):
        certificate, signature = credentials[j]
        try:
            name, public = pki.verify_certificate(ca_public, certificate)
        except pki.CertificateError as exc:
            raise ParameterError(f"neighbour {j}: {exc}") from None
        statement = pki.round_keys_statement(params.digest(), j, *peer_keys[j])
        if not pki.verify(public, statement, signature):
            raise ParameterError(f"neighbour {j}'s keys are not signed by its certified key for this round")
        if name in names:
            raise ParameterError(f"certified device {name!r} appears twice among our neighbours (a Sybil)")
        names.add(name)
        identities[j] = public
    return identities


def device_mask(
    session: DeviceSession,
    params: Params,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    encoded_input: np.ndarray,
) -> tuple[dict[int, bytes], np.ndarray]:
    """Step 2: sealed shares of our self-mask seed for each neighbour, and our masked vector.

    `peer_keys`: neighbour id -> (c_public, s_public) for the neighbours alive after step 1,
    already accepted by `check_peer_keys`."""
    _check_session(session, params)
    if session.masked_with:
        raise ParameterError("this device already sent its masked vector in this round")
    check_peer_keys(session, params, peer_keys)
    peers = sorted(peer_keys)
    if len(peers) < params.threshold:
        raise SecAggAbort(f"only {len(peers)} neighbours alive, threshold is {params.threshold}")
    shares = split(session.self_seed, params.threshold, peers)
    sealed = {
        j: seal(
            _share_key(session, params, peer_keys[j][0]),
            shares[j],
            share_aad(params.run_id, params.server_round, session.my_id, j),
        )
        for j in peers
    }
    pair_context = params.context("pair-seed")
    pairwise = {j: agree(session.s_key(), peer_keys[j][1], pair_context) for j in peers}
    masked = masked_input(
        encoded_input, session.self_seed, pairwise, session.my_id, params.modulus_bits, params.context("mask")
    )
    session.masked_with = tuple(peers)
    return sealed, masked


def check_survivors(
    session: DeviceSession, params: Params, survivors: Iterable[int]
) -> tuple[set[int], set[int]]:
    """The survivor set S a server announces, checked from this device's point of view.

    Returns (neighbours in S: reveal their self-mask share, neighbours not in S: reveal the
    pairwise seed). Refuses unless the device itself is in S, every id is a member, and at least
    t of the neighbours it masked with are in S: then it reveals at most k - t < t pairwise seeds,
    too few for anyone to pair with shares of its own seed."""
    _check_session(session, params)
    listed = list(survivors)
    if any(isinstance(j, bool) or not isinstance(j, int) for j in listed) or len(set(listed)) != len(listed):
        raise ParameterError("survivor list must hold distinct integer ids")
    members = set(range(1, params.n + 1))
    strangers = sorted(set(listed) - members)
    if strangers:
        raise ParameterError(f"survivor list names ids {strangers[:5]} that are not members of this group")
    if not session.masked_with:
        raise ParameterError("this device sent no masked vector in this round: nothing to unmask")
    s = set(listed)
    if session.my_id not in s:
        raise ParameterError("this device is not listed as a survivor: refusing to reveal anything")
    mine = set(session.masked_with)
    alive, gone = mine & s, mine - s
    if len(alive) < params.threshold:
        raise ParameterError(
            f"only {len(alive)} of this device's {len(mine)} neighbours are listed as survivors, below "
            f"the threshold {params.threshold}: revealing seeds with the others could unmask it"
        )
    return alive, gone


def device_endorse(
    session: DeviceSession, params: Params, survivors: Iterable[int], signing_key: bytes
) -> bytes:
    """Step 3 (PKI): check S and sign it; the device will unmask for this S and no other."""
    if session.revealed or session.survivors:
        raise ParameterError("this device already endorsed a survivor set in this round")
    listed = sorted(survivors)
    check_survivors(session, params, listed)
    session.survivors = tuple(listed)
    return pki.sign(signing_key, pki.survivors_statement(session.params_digest, session.my_id, listed))


@dataclass
class Reveal:
    """Step "unmask" reply: shares of surviving neighbours' seeds, pairwise seeds with the vanished."""

    self_seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner id -> our share of it
    pair_seeds: dict[int, bytes] = field(default_factory=dict)  # vanished id -> seed we share
    tampered: list[int] = field(default_factory=list)  # senders whose sealed share failed to open


def device_unmask(
    session: DeviceSession,
    params: Params,
    survivors: Iterable[int],
    sealed_for_me: Mapping[int, bytes],
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    *,
    endorsements: Mapping[int, bytes] | None = None,
    identities: Mapping[int, bytes] | None = None,
) -> Reveal:
    """Step "unmask": open the shares sent to us and reveal what recovery needs, and nothing more.

    With a PKI (`identities`: neighbours' certified signing keys), S must be the set this device
    signed, and at least t of its neighbours in S must have signed exactly S too."""
    _check_session(session, params)
    if session.revealed:
        raise ParameterError("this device already revealed its shares in this round")
    listed = sorted(survivors)
    alive, gone = check_survivors(session, params, listed)
    if identities is not None:
        if not session.survivors:
            raise ParameterError("certified round: the survivor set was never endorsed by this device")
        if tuple(listed) != session.survivors:
            raise ParameterError("the survivor set differs from the one this device signed")
        given = dict(endorsements or {})
        signed = [
            j
            for j in sorted(alive & set(identities) & set(given))
            if pki.verify(identities[j], pki.survivors_statement(session.params_digest, j, listed), given[j])
        ]
        if len(signed) < params.threshold:
            raise ParameterError(
                f"only {len(signed)} of this device's neighbours signed this survivor set, threshold "
                f"{params.threshold}: the server may be showing other devices another set"
            )
    session.revealed = True
    reveal = Reveal()
    for j in sorted(alive):
        if j not in sealed_for_me:
            continue
        key = _share_key(session, params, peer_keys[j][0])
        try:
            reveal.self_seed_shares[j] = open_(
                key, sealed_for_me[j], share_aad(params.run_id, params.server_round, j, session.my_id)
            )
        except TamperedShareError:
            reveal.tampered.append(j)
    pair_context = params.context("pair-seed")
    for j in sorted(gone):
        reveal.pair_seeds[j] = agree(session.s_key(), peer_keys[j][1], pair_context)
    return reveal


# -- server side ------------------------------------------------------------------------------


@dataclass
class ServerRound:
    """The server's view of one group's round: public keys, the running masked sum, reveals."""

    params: Params
    ca_public: bytes | None = None  # with a PKI: keys must be signed by certified devices
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # after step 1
    credentials: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (certificate, signature)
    identities: dict[int, bytes] = field(default_factory=dict)  # certified signing keys
    names: dict[str, int] = field(default_factory=dict)  # certified name -> protocol id
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> ct
    masked_sum: np.ndarray | None = None
    survivors: set[int] = field(default_factory=set)  # sent a valid masked vector in step 2
    endorsements: dict[int, bytes] = field(default_factory=dict)  # survivor -> signature on S
    revealed: set[int] = field(default_factory=set)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # owner -> holder -> share
    pair_seeds: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (survivor, vanished)
    blamed: dict[int, str] = field(default_factory=dict)  # protocol id -> what it did (logged)

    def add_keys(
        self, device: int, c_public: bytes, s_public: bytes, credential: tuple[bytes, bytes] | None = None
    ) -> None:
        """Accept a device's step-1 keys, or raise ValueError (it then counts as never arrived)."""
        if not 1 <= device <= self.params.n:
            raise ValueError(f"device {device} is not a member of this group")
        if device in self.keys:
            raise ValueError(f"device {device} already sent its keys")
        c_public, s_public = bytes(c_public), bytes(s_public)
        for key in (c_public, s_public):
            check_public_key(key)  # low-order or malformed: refused here, not by its neighbours
        taken = {k for pair in self.keys.values() for k in pair}
        if c_public == s_public or {c_public, s_public} & taken:
            raise ValueError("public keys repeat a key already in this round")
        if self.ca_public is not None:
            if credential is None:
                raise ValueError(
                    "keys come without a certificate and signature (certified keys are required)"
                )
            certificate, signature = bytes(credential[0]), bytes(credential[1])
            name, public = pki.verify_certificate(self.ca_public, certificate)
            if not pki.verify(
                public, pki.round_keys_statement(self.params.digest(), device, c_public, s_public), signature
            ):
                raise ValueError("round keys are not signed by the device's certified key")
            if name in self.names:
                raise ValueError(f"certified device {name!r} already holds position {self.names[name]}")
            self.names[name] = device
            self.credentials[device] = (certificate, signature)
            self.identities[device] = public
        self.keys[device] = (c_public, s_public)

    def peer_keys_for(self, device: int) -> dict[int, tuple[bytes, bytes]]:
        graph = self.params.graph()
        return {j: self.keys[j] for j in sorted(graph[device]) if j in self.keys}

    def peer_credentials_for(self, device: int) -> dict[int, tuple[bytes, bytes]]:
        return {j: self.credentials[j] for j in self.peer_keys_for(device) if j in self.credentials}

    def add_masked(self, device: int, sealed: Mapping[int, bytes], masked: np.ndarray) -> None:
        """Fold one device's step-2 reply in (validated first: a bad vector raises, nothing added)."""
        if device not in self.keys:
            raise ValueError(f"device {device} sent no keys in step 1: its vector cannot be unmasked")
        if device in self.survivors:  # folded in twice, it would silently corrupt the sum
            raise ValueError(f"device {device} already sent its masked vector")
        vector = check_masked_vector(masked, self.params.length, self.params.modulus_bits)
        expected = set(self.peer_keys_for(device))
        if set(sealed) != expected:
            raise ValueError(
                f"device {device} sealed shares for {sorted(sealed)}, expected {sorted(expected)}"
            )
        # uint64 addition wraps mod 2^64, a multiple of 2^m: one running vector, any order
        self.masked_sum = vector.copy() if self.masked_sum is None else self.masked_sum + vector
        for receiver, ct in sealed.items():
            self.sealed.setdefault(receiver, {})[device] = bytes(ct)
        self.survivors.add(device)

    def vanished(self) -> set[int]:
        """Devices that sent keys in step 1 but no valid masked vector in step 2."""
        return set(self.keys) - self.survivors

    def sealed_for(self, device: int) -> dict[int, bytes]:
        return {s: ct for s, ct in self.sealed.get(device, {}).items() if s in self.survivors}

    def add_endorsement(self, device: int, signature: bytes) -> None:
        """A survivor's signature on the survivor set (PKI rounds); a bad one raises ValueError."""
        statement = pki.survivors_statement(self.params.digest(), device, self.survivors)
        if device not in self.survivors or not pki.verify(
            self.identities.get(device, b""), statement, signature
        ):
            raise ValueError(f"device {device}'s signature on the survivor set does not verify")
        self.endorsements[device] = bytes(signature)

    def endorsements_for(self, device: int) -> dict[int, bytes]:
        graph = self.params.graph()
        return {j: sig for j, sig in self.endorsements.items() if j in graph[device]}

    def add_reveal(self, device: int, reveal: Reveal) -> None:
        if device not in self.survivors or device in self.revealed:
            raise ValueError(f"device {device} may not reveal (not a survivor, or revealed already)")
        self.revealed.add(device)
        graph = self.params.graph()
        vanished = self.vanished()
        for owner, share in reveal.self_seed_shares.items():
            if owner in self.survivors and owner in graph[device]:
                self.shares.setdefault(owner, {})[device] = bytes(share)
        for gone, seed in reveal.pair_seeds.items():
            if gone in vanished and gone in graph[device]:
                self.pair_seeds[(device, gone)] = bytes(seed)
        for sender in reveal.tampered:
            if sender in graph[device]:
                # AES-GCM authenticated what the server relayed as the sender sent it: the sender
                # sealed garbage (or the server tampered, which an honest server did not)
                self.blamed.setdefault(sender, f"sent device {device} a share that fails authentication")

    def _seed_of(self, owner: int) -> bytes:
        """Rebuild `owner`'s self-mask seed; a holder whose share alone breaks consistency is
        named and left out (given t + 1 consistent others), else the owner is named."""
        t = self.params.threshold
        held = self.shares.get(owner, {})
        if len(held) < t:
            raise SecAggAbort(f"device {owner}: {len(held)} shares of its mask seed, threshold {t}")
        try:
            return combine(held, t)
        except ValueError:
            pass
        for holder in sorted(held):
            rest = {h: s for h, s in held.items() if h != holder}
            if len(rest) <= t:
                break  # t shares always interpolate: no longer a check
            try:
                seed = combine(rest, t)
            except ValueError:
                continue
            self.blamed[holder] = f"revealed a false share of device {owner}'s self-mask seed"
            return seed
        raise SecAggAbort(
            f"shares of device {owner}'s self-mask seed lie on no single polynomial, even without any one "
            f"holder: device {owner} dealt inconsistent shares or several holders revealed false ones",
            blame=[owner],
        )

    def finish(self) -> np.ndarray:
        """The plain modular sum of the survivors' encoded inputs (raises SecAggAbort)."""
        if self.masked_sum is None or len(self.survivors) < self.params.threshold:
            raise SecAggAbort(
                f"{len(self.survivors)} devices sent masked vectors, threshold {self.params.threshold}"
            )
        graph = self.params.graph()
        vanished = self.vanished()
        needed = {(s, g) for s in self.survivors for g in graph[s] & vanished}
        missing = sorted(needed - set(self.pair_seeds))
        if missing:
            raise SecAggAbort(
                f"pairwise seeds with vanished devices were not revealed for {missing[:3]} (survivor, gone)"
            )
        seeds = {owner: self._seed_of(owner) for owner in sorted(self.survivors)}
        return unmask_sum(
            self.masked_sum,
            seeds,
            [(s, g, seed) for (s, g), seed in self.pair_seeds.items()],
            self.params.modulus_bits,
            self.params.context("mask"),
        )


def member_ids(nodes: Sequence[int]) -> dict[int, int]:
    """Flower node id -> protocol id 1..n (sorted node ids: the same on every device)."""
    return {node: i + 1 for i, node in enumerate(sorted(nodes))}
