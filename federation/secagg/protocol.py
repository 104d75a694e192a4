"""One round of secure aggregation, as pure client and server steps (no Flower here).

SecAgg+ (Bell et al., CCS 2020) over a sparse neighbour graph, with the dropout recovery of
SecAgg (Bonawitz et al., CCS 2017), in three server<->device exchanges per round, the first one
carrying the training itself:

1. **keys** — the server sends each sampled device the global state and the round's public
   parameters; the device trains, keeps its contribution to itself, draws two X25519 key pairs
   (`c`: to encrypt shares, `s`: to derive pairwise masks) and a self-mask seed `b`, and
   replies with its two public keys only.
2. **mask** — the server sends each device its neighbours' public keys. The device splits `b`
   into t-out-of-k Shamir shares, seals one per neighbour with AES-GCM (key from X25519 on the
   `c` keys; the associated data binds run, round, sender and receiver), derives one pairwise
   seed per neighbour from the `s` keys, and replies with the sealed shares and its masked
   vector y = x + PRG(b) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) (mod 2^m).
3. **unmask** — the server names who survived step 2. Each survivor opens the shares sent to it
   and reveals, for every surviving neighbour, its share of that neighbour's `b`, and, for every
   neighbour that vanished after step 1, their pairwise seed s_ij (never both for one
   neighbour). The server rebuilds each survivor's `b` from t shares, removes the self masks
   and the pairwise masks shared with the vanished, and decodes the sum.

Without dropouts a round is these 3 exchanges; a dropout adds none (recovery rides on step 3).
Against Bonawitz's four steps, the pairwise masks of a device that vanishes after step 1 are
recovered from its surviving neighbours' revealed seeds instead of from Shamir shares of its
mask key, which it may never have sent: this is what lets step 2 carry both the shares and the
masked vector. What the server learns is the same: a vanished device's seeds only cover masks on
a vector that never arrived, and an honest device reveals a neighbour's `b` share or their
pairwise seed, never both, so a vector that did arrive stays masked.

Device ids inside the protocol are 1..n, the positions of the round's members (Flower node ids
are 64-bit and only the server needs them).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from federation.secagg.context import pack_fields, round_context, share_aad
from federation.secagg.envelope import TamperedShareError, open_, seal
from federation.secagg.graph import neighbours, recommended_degree, recommended_threshold
from federation.secagg.masking import agree, check_masked_vector, masked_input, unmask_sum
from federation.secagg.quantize import modulus_bits
from federation.secagg.shamir import combine, split


class SecAggAbort(RuntimeError):
    """The round cannot complete securely (too few survivors or shares); nothing is revealed."""


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
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> Params:
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
        )

    def digest(self) -> bytes:
        """Binds a device's session to exactly these parameters."""
        fields = self.to_config()
        return pack_fields(
            *(f"{k}={v!r}" if not isinstance(v, bytes) else v for k, v in sorted(fields.items()))
        )


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
    dropout_rate: float = 0.3,
) -> Params:
    """The server's public parameters for a group of n devices (graph seed fresh per round)."""
    if n < 2:
        raise SecAggAbort(f"secure aggregation needs at least 2 devices in group {group!r}, got {n}")
    degree = recommended_degree(n, dropout_rate=dropout_rate) if n > 2 else n - 1
    degree = max(1, min(degree, n - 1))
    threshold = max(1, min(recommended_threshold(degree), degree))
    weight_bits = max(1, math.ceil(math.log2(max_weight + 1)))
    m = modulus_bits(value_bits, n, weight_bits)
    return Params(
        run_id=run_id,
        server_round=server_round,
        group=group,
        n=n,
        degree=degree,
        threshold=threshold,
        graph_seed=os.urandom(32),
        clip=clip,
        value_bits=value_bits,
        modulus_bits=m,
        max_weight=max_weight,
        length=length,
    )


# -- device side ------------------------------------------------------------------------------


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class DeviceSession:
    """A device's secrets for one round; kept on the device (in its node state), never sent."""

    my_id: int
    params_digest: bytes
    c_private: bytes
    s_private: bytes
    self_seed: bytes
    masked_with: tuple[int, ...] = ()  # neighbours whose pairwise masks are in our vector
    shared_with: tuple[int, ...] = ()  # neighbours who hold a share of our self-mask seed

    def c_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.c_private)

    def s_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.s_private)


def device_keys(params: Params, my_id: int) -> tuple[DeviceSession, bytes, bytes]:
    """Step 1: fresh key pairs and self-mask seed. Returns (session, c_public, s_public)."""
    if not 1 <= my_id <= params.n:
        raise ValueError(f"device id {my_id} outside 1..{params.n}")
    c_key, s_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    session = DeviceSession(my_id, params.digest(), _raw_private(c_key), _raw_private(s_key), os.urandom(32))
    return session, _raw_public(c_key), _raw_public(s_key)


def _check_session(session: DeviceSession, params: Params) -> None:
    if session.params_digest != params.digest():
        raise ValueError(
            "secure-aggregation message does not belong to this device's round (run/round/group)"
        )


def _share_key(session: DeviceSession, params: Params, peer_c_public: bytes) -> bytes:
    return agree(session.c_key(), peer_c_public, params.context("share-key"))


def device_mask(
    session: DeviceSession,
    params: Params,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    encoded_input: np.ndarray,
) -> tuple[dict[int, bytes], np.ndarray]:
    """Step 2: sealed shares of our self-mask seed for each neighbour, and our masked vector.

    `peer_keys`: neighbour id -> (c_public, s_public) for the neighbours alive after step 1.
    """
    _check_session(session, params)
    mine = params.graph()[session.my_id]
    unknown = set(peer_keys) - mine
    if unknown:
        raise ValueError(f"server sent keys of devices {sorted(unknown)} that are not our neighbours")
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
    session.shared_with = tuple(peers)
    return sealed, masked


@dataclass
class Reveal:
    """Step 3 reply: shares of surviving neighbours' seeds, pairwise seeds with the vanished."""

    self_seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner id -> our share of it
    pair_seeds: dict[int, bytes] = field(default_factory=dict)  # vanished id -> seed we share
    tampered: list[int] = field(default_factory=list)  # senders whose sealed share failed to open


def device_unmask(
    session: DeviceSession,
    params: Params,
    survivors: Iterable[int],
    vanished: Iterable[int],
    sealed_for_me: Mapping[int, bytes],
    peer_keys: Mapping[int, tuple[bytes, bytes]],
) -> Reveal:
    """Step 3: open the shares sent to us and reveal what recovery needs, and nothing more."""
    _check_session(session, params)
    survivors, vanished = set(survivors), set(vanished)
    if survivors & vanished:
        raise ValueError("a device cannot be both a survivor and vanished: refusing to reveal")
    if len(survivors) < params.threshold:
        raise SecAggAbort(f"{len(survivors)} survivors is below the threshold {params.threshold}")
    reveal = Reveal()
    mine = set(session.masked_with)
    for j in sorted(survivors & mine):
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
    for j in sorted(vanished & mine):
        reveal.pair_seeds[j] = agree(session.s_key(), peer_keys[j][1], pair_context)
    return reveal


# -- server side ------------------------------------------------------------------------------


@dataclass
class ServerRound:
    """The server's view of one group's round: public keys, the running masked sum, reveals."""

    params: Params
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # after step 1
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> ct
    masked_sum: np.ndarray | None = None
    survivors: set[int] = field(default_factory=set)  # sent a valid masked vector in step 2
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # owner -> holder -> share
    pair_seeds: list[tuple[int, int, bytes]] = field(default_factory=list)

    def add_keys(self, device: int, c_public: bytes, s_public: bytes) -> None:
        if len(c_public) != 32 or len(s_public) != 32:
            raise ValueError("X25519 public keys are 32 bytes")
        self.keys[device] = (c_public, s_public)

    def peer_keys_for(self, device: int) -> dict[int, tuple[bytes, bytes]]:
        graph = self.params.graph()
        return {j: self.keys[j] for j in sorted(graph[device]) if j in self.keys}

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

    def add_reveal(self, device: int, reveal: Reveal) -> None:
        graph = self.params.graph()
        for owner, share in reveal.self_seed_shares.items():
            if owner in self.survivors and owner in graph[device]:
                self.shares.setdefault(owner, {})[device] = share
        for gone, seed in reveal.pair_seeds.items():
            if gone in self.vanished() and gone in graph[device]:
                self.pair_seeds.append((device, gone, seed))

    def finish(self) -> np.ndarray:
        """The plain modular sum of the survivors' encoded inputs (raises SecAggAbort)."""
        if self.masked_sum is None or len(self.survivors) < self.params.threshold:
            raise SecAggAbort(
                f"{len(self.survivors)} devices sent masked vectors, threshold {self.params.threshold}"
            )
        graph = self.params.graph()
        needed = {(s, g) for s in self.survivors for g in graph[s] & self.vanished()}
        have = {(s, g) for s, g, _ in self.pair_seeds}
        if needed - have:
            missing = sorted(needed - have)[:3]
            raise SecAggAbort(f"pairwise seeds with vanished devices were not revealed for {missing}")
        seeds: dict[int, bytes] = {}
        for owner in self.survivors:
            held = self.shares.get(owner, {})
            if len(held) < self.params.threshold:
                raise SecAggAbort(
                    f"device {owner}: {len(held)} shares of its mask seed, threshold {self.params.threshold}"
                )
            try:
                seeds[owner] = combine(held, self.params.threshold)
            except ValueError as exc:  # inconsistent shares: a tampered or corrupt reveal
                raise SecAggAbort(f"device {owner}'s self-mask shares are inconsistent ({exc})") from None
        return unmask_sum(
            self.masked_sum, seeds, self.pair_seeds, self.params.modulus_bits, self.params.context("mask")
        )


def member_ids(nodes: Sequence[int]) -> dict[int, int]:
    """Flower node id -> protocol id 1..n (sorted node ids: the same on every device)."""
    return {node: i + 1 for i, node in enumerate(sorted(nodes))}
