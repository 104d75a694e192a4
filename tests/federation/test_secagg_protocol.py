"""Full secure-aggregation rounds driven through `federation.secagg.protocol` (pure, no Flower).

Every round here is the real three-step protocol: `device_keys` -> `ServerRound.add_keys`,
`device_mask` -> `ServerRound.add_masked`, `device_unmask` -> `ServerRound.add_reveal`, then
`ServerRound.finish` and `vector.decode_total`. Inputs are realistic contributions: LoRA B
deltas [out, 8] (devices of rank 2, 4 or 8, zero-padded) plus head keys, deltas ~ N(0, 0.02),
integer weights 1..500, with the run's default clip, value bits and max weight.

`encode` rounds stochastically, so each device's input is encoded once and that same vector is
both masked and summed in plaintext for the reference: the secure sum must equal it exactly.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from federation.rules import exact_mixed_rank
from federation.secagg import MaskedVectorError, pki, quantization_error_bound
from federation.secagg.masking import unmask_sum
from federation.secagg.protocol import (
    DeviceSession,
    Expected,
    ParameterError,
    Params,
    Reveal,
    SecAggAbort,
    ServerRound,
    check_peer_keys,
    device_endorse,
    device_keys,
    device_mask,
    device_unmask,
    plan,
)
from federation.secagg.quantize import decode_signed, encode_integers
from federation.secagg.shamir import combine, split
from federation.secagg.vector import (
    ImplausibleSumError,
    check_plausible_sum,
    decode_total,
    encode_update,
    vector_length,
)

RULE = exact_mixed_rank.RULE

# A phone-style attention B, sensor-style conv/proj Bs, and a classification head.
SHAPES: dict[str, tuple[int, ...]] = {
    "lora.encoder.layer.0.attention.self.query.lora_B.weight": (384, 8),
    "lora.conv2.lora_B.weight": (64, 8),
    "lora.conv3.lora_B.weight": (64, 8),
    "lora.proj.lora_B.weight": (128, 8),
    "head.norm.weight": (128,),
    "head.norm.bias": (128,),
    "head.out.weight": (6, 128),
    "head.out.bias": (6,),
}
CLIP, VALUE_BITS, MAX_WEIGHT = 1.0, 24, 100_000  # the run config's defaults
RUN_ID, ROUND, GROUP = 0x5EC_A66, 3, "sensor"


def expected_for(params: Params) -> Expected:
    """What a device of this test's run knows without the server (its own run config)."""
    dropout = 0.05 if params.degree < params.n - 1 else 0.3  # the sparse-graph tests plan for 5%
    return Expected(RUN_ID, GROUP, CLIP, VALUE_BITS, MAX_WEIGHT, min_devices=3, dropout_rate=dropout)


# ---------------------------------------------------------------------------------------- harness


@dataclass
class Contribution:
    delta: dict[str, np.ndarray]
    weight: int
    rank: int
    encoded: np.ndarray  # encoded ONCE: the same vector is masked and summed in plaintext


def _params(n: int, **overrides: object) -> Params:
    params = plan(
        RUN_ID,
        ROUND,
        GROUP,
        n,
        vector_length(RULE, SHAPES),
        clip=CLIP,
        value_bits=VALUE_BITS,
        max_weight=MAX_WEIGHT,
        **overrides,  # type: ignore[arg-type]
    )
    return params


def _contribution(rng: np.random.Generator, params: Params) -> Contribution:
    rank = int(rng.choice([2, 4, 8]))
    delta: dict[str, np.ndarray] = {}
    for key, shape in SHAPES.items():
        value = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
        if exact_mixed_rank.is_column_key(key):
            value[:, rank:] = 0.0  # a rank-r device trains B's first r columns only
        delta[key] = value
    weight = int(rng.integers(1, 501))
    return Contribution(delta, weight, rank, encode_update(RULE, delta, weight, SHAPES, params, rank=rank))


@dataclass
class Round:
    """A round's devices (protocol ids 1..n) and the server, stepped explicitly by the tests."""

    params: Params
    inputs: dict[int, Contribution]
    server: ServerRound
    sessions: dict[int, DeviceSession] = field(default_factory=dict)
    peers: dict[int, dict[int, tuple[bytes, bytes]]] = field(default_factory=dict)  # device-side copy
    reveals: dict[int, Reveal] = field(default_factory=dict)
    replies: dict[int, tuple[dict[int, bytes], np.ndarray]] = field(default_factory=dict)

    @classmethod
    def start(cls, n: int, seed: int, params: Params | None = None) -> Round:
        params = params or _params(n)
        rng = np.random.default_rng(seed)
        inputs = {i: _contribution(rng, params) for i in range(1, n + 1)}
        return cls(params, inputs, ServerRound(params))

    def keys(self, ids: list[int] | None = None) -> None:
        for i in ids or list(self.inputs):
            session, c_pk, s_pk = device_keys(self.params, i, expected_for(self.params))
            self.sessions[i] = session
            self.server.add_keys(i, c_pk, s_pk)

    def mask(self, ids: list[int] | None = None) -> dict[int, tuple[dict[int, bytes], np.ndarray]]:
        """Step 2 for `ids` (default: everyone who sent keys); replies are folded into the server."""
        replies = {}
        for i in ids if ids is not None else sorted(self.sessions):
            self.peers[i] = self.server.peer_keys_for(i)
            replies[i] = device_mask(self.sessions[i], self.params, self.peers[i], self.inputs[i].encoded)
        for i, (sealed, masked) in replies.items():
            self.server.add_masked(i, sealed, masked)
        self.replies.update(replies)
        return replies

    def unmask(self, ids: list[int] | None = None) -> None:
        survivors = sorted(self.server.survivors)
        for i in ids if ids is not None else survivors:
            reveal = device_unmask(
                self.sessions[i], self.params, survivors, self.server.sealed_for(i), self.peers[i]
            )
            # an honest device never reveals both secrets of one neighbour
            assert not set(reveal.self_seed_shares) & set(reveal.pair_seeds)
            self.reveals[i] = reveal
            self.server.add_reveal(i, reveal)

    def plain_sum(self, ids: set[int] | list[int]) -> np.ndarray:
        """The plaintext modular sum of the same encoded inputs (uint64 wraps; reduce mod 2^m)."""
        total = np.zeros(self.params.length, dtype=np.uint64)
        for i in ids:
            total += self.inputs[i].encoded
        return total & np.uint64((1 << self.params.modulus_bits) - 1)


def _weighted_sums(inputs: list[Contribution]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k and the per-key weight sums, in float64 (the exact, unquantized target)."""
    out: dict[str, np.ndarray] = {}
    for c in inputs:
        for key, value in exact_mixed_rank.contribution(c.delta, float(c.weight), c.rank).items():
            if key.endswith(exact_mixed_rank.WEIGHT):
                add = value.astype(np.float64)
            else:
                add = np.clip(c.delta[key].astype(np.float64), -CLIP, CLIP) * c.weight
            out[key] = out.get(key, 0) + add
    return out


def _check_decoded(r: Round, ids: set[int] | list[int], total: np.ndarray) -> dict[str, np.ndarray]:
    decoded = decode_total(RULE, total, SHAPES, r.params)
    inputs = [r.inputs[i] for i in ids]
    expected = _weighted_sums(inputs)
    assert set(decoded) == set(expected) == set(exact_mixed_rank.expected_shapes(SHAPES))
    bound = quantization_error_bound(CLIP, VALUE_BITS, len(inputs), max_weight=max(c.weight for c in inputs))
    for key, value in decoded.items():
        assert value.shape == expected[key].shape, key
        if key.endswith(exact_mixed_rank.WEIGHT):
            np.testing.assert_array_equal(value, expected[key], err_msg=key)  # weights are exact
        else:
            assert np.max(np.abs(value - expected[key])) <= bound, key
    return decoded


# ------------------------------------------------------------------------------------ exact sums


def test_params_travel_as_config_and_bind_the_session() -> None:
    params = _params(10)
    assert params.degree == 9 and params.threshold == 5  # n <= 100: the complete graph (SecAgg)
    assert params.length == vector_length(RULE, SHAPES)
    again = Params.from_config(params.to_config())
    assert again == params and again.digest() == params.digest()
    for change in ({"server_round": ROUND + 1}, {"run_id": RUN_ID + 1}, {"group": "phone"}, {"length": 1}):
        assert dataclasses.replace(params, **change).digest() != params.digest()  # type: ignore[arg-type]
    assert _params(10).graph_seed != params.graph_seed  # a fresh graph seed every round


def test_secure_sum_equals_plain_modular_sum_and_decodes_to_the_weighted_mean() -> None:
    r = Round.start(10, seed=1)
    r.keys()
    r.mask()
    r.unmask()
    total = r.server.finish()
    assert total.dtype == np.uint64 and total.shape == (r.params.length,)
    np.testing.assert_array_equal(total, r.plain_sum(r.inputs))  # exact, bit for bit

    decoded = _check_decoded(r, list(r.inputs), total)

    # Server side: one secure sum folded into the aggregation state vs the plain per-device sum.
    rng = np.random.default_rng(99)
    global_state = {k: rng.normal(0, 0.1, size=s).astype(np.float32) for k, s in SHAPES.items()}
    secure = exact_mixed_rank.apply(exact_mixed_rank.add(exact_mixed_rank.init(), decoded), global_state)
    plain_state = exact_mixed_rank.init()
    for c in r.inputs.values():
        exact_mixed_rank.add(plain_state, exact_mixed_rank.contribution(c.delta, float(c.weight), c.rank))
    plain = exact_mixed_rank.apply(plain_state, global_state)
    mean_bound = quantization_error_bound(CLIP, VALUE_BITS, 1)  # a weighted mean is off < 1 quantum
    for key in SHAPES:
        assert secure[key].dtype == global_state[key].dtype == np.float32
        tol = mean_bound + 2 * np.spacing(np.abs(plain[key]))  # + float32 rounding of the new state
        assert np.all(np.abs(secure[key].astype(np.float64) - plain[key]) <= tol), key
        assert not np.array_equal(secure[key], global_state[key]), key  # the model did move
    # columns nobody trained keep their value; rank-2 columns are the mean over every device
    ranks = {c.rank for c in r.inputs.values()}
    for key in (k for k in SHAPES if exact_mixed_rank.is_column_key(k)):
        np.testing.assert_array_equal(
            decoded[key + exact_mixed_rank.WEIGHT][:2], sum(c.weight for c in r.inputs.values())
        )
        if max(ranks) < 8:
            np.testing.assert_array_equal(secure[key][:, max(ranks) :], global_state[key][:, max(ranks) :])


@pytest.mark.parametrize("n", [10, 20])
def test_thirty_percent_vanish_after_keys_exact_sum_over_survivors(n: int) -> None:
    r = Round.start(n, seed=n)
    r.keys()
    rng = np.random.default_rng(1000 + n)
    gone = {int(i) for i in rng.choice(np.arange(1, n + 1), size=int(0.3 * n), replace=False)}
    survivors = sorted(set(r.inputs) - gone)
    r.mask(survivors)  # the vanished never answer step 2
    assert r.server.survivors == set(survivors) and r.server.vanished() == gone
    r.unmask()
    for i in survivors:  # each survivor revealed its pairwise seeds with every vanished neighbour
        assert set(r.reveals[i].pair_seeds) == gone & r.params.graph()[i]
    total = r.server.finish()
    np.testing.assert_array_equal(total, r.plain_sum(survivors))
    _check_decoded(r, survivors, total)


def test_device_vanishing_after_mask_is_still_in_the_sum() -> None:
    r = Round.start(10, seed=3)
    r.keys()
    r.mask()
    late = 4
    r.unmask([i for i in r.inputs if i != late])  # device 4 never answers step 3
    assert late not in r.reveals and late in r.server.survivors
    held = r.server.shares[late]
    assert late not in held and len(held) >= r.params.threshold  # its seed comes back from shares
    total = r.server.finish()
    np.testing.assert_array_equal(total, r.plain_sum(r.inputs))  # device 4's input is counted


def test_vanishing_in_both_steps_among_neighbours_aborts_instead_of_a_wrong_sum() -> None:
    # Design limit of the 3-step protocol: the pairwise mask between a device that vanished after
    # step 1 and a neighbour that vanished after step 2 can only be revealed by those two devices
    # (no Shamir shares of mask keys), so the server must abort rather than decode garbage.
    r = Round.start(10, seed=4)
    r.keys()
    r.mask([i for i in r.inputs if i != 2])  # 2 vanishes after keys
    r.unmask([i for i in r.server.survivors if i != 7])  # 7 vanishes after its masked vector
    assert 2 in r.params.graph()[7]
    with pytest.raises(SecAggAbort, match="pairwise seeds with vanished devices were not revealed"):
        r.server.finish()


def test_sparse_graph_round_with_dropouts() -> None:
    # SecAgg+ proper: n = 40 with a low planned dropout rate gives a sparse neighbour graph.
    n = 40
    params = _params(n, dropout_rate=0.05)
    assert params.degree < n - 1 and params.threshold <= params.degree
    graph = params.graph()
    assert all(len(graph[i]) >= params.degree for i in graph)
    r = Round.start(n, seed=5, params=params)
    # device 1 will vanish after step 2, so the three that vanish after keys (7.5%) are taken
    # among its non-neighbours (see the test above for why); one more never answers step 1
    late = 1
    absent, *rest = sorted(set(range(2, n + 1)) - graph[late])[:4]
    gone = set(rest)
    assert len(gone) == 3
    r.keys([i for i in r.inputs if i != absent])
    r.mask([i for i in r.inputs if i not in gone | {absent}])
    for i, peers in r.peers.items():  # a device gets the keys of its neighbours that sent any
        assert set(peers) == graph[i] - {absent}
    assert r.server.vanished() == gone  # never having sent keys is not vanishing
    r.unmask([i for i in r.server.survivors if i != late])
    total = r.server.finish()
    survivors = sorted(set(r.inputs) - gone - {absent})
    np.testing.assert_array_equal(total, r.plain_sum(survivors))
    _check_decoded(r, survivors, total)


# -------------------------------------------------------------------------------- below threshold


def test_too_few_survivors_aborts_with_no_result() -> None:
    r = Round.start(10, seed=6)
    r.keys()
    t = r.params.threshold
    survivors = list(range(1, t))  # t - 1 masked vectors arrive
    r.mask(survivors)
    with pytest.raises(ParameterError, match="below the threshold"):
        r.unmask()  # honest devices refuse to reveal anything for so few survivors
    assert r.reveals == {} and r.server.shares == {} and r.server.pair_seeds == {}
    with pytest.raises(SecAggAbort, match="threshold"):
        r.server.finish()


def test_too_few_reveals_aborts_with_no_result() -> None:
    r = Round.start(10, seed=7)
    r.keys()
    r.mask()
    r.unmask(list(range(1, r.params.threshold)))  # only t - 1 devices answer step 3
    with pytest.raises(SecAggAbort, match="shares of its mask seed"):
        r.server.finish()


def test_device_refuses_to_mask_with_too_few_live_neighbours() -> None:
    r = Round.start(10, seed=8)
    r.keys(list(range(1, r.params.threshold)))  # only t - 1 devices sent keys: t - 2 peers each
    with pytest.raises(SecAggAbort, match="neighbours alive"):
        r.mask([1])


# --------------------------------------------------------------------- what the server receives


def test_masked_vectors_look_uniform_and_uncorrelated_with_the_inputs() -> None:
    r = Round.start(10, seed=9)
    # devices 1 and 2 hold the very same encoded input
    r.inputs[2] = dataclasses.replace(r.inputs[2], encoded=r.inputs[1].encoded.copy())
    r.keys()
    replies = r.mask()
    m, length = r.params.modulus_bits, r.params.length
    masked = {i: y for i, (_, y) in replies.items()}

    def chi_square_top_bits(vectors: list[np.ndarray], bits: int = 8) -> float:
        top = np.concatenate([v >> np.uint64(m - bits) for v in vectors]).astype(np.int64)
        counts = np.bincount(top, minlength=2**bits)
        expected = top.size / 2**bits
        return float(((counts - expected) ** 2 / expected).sum())

    # chi-square, 255 degrees of freedom: P[X > 414.5] = 1e-9 for uniform residues
    assert chi_square_top_bits(list(masked.values())) < 414.5
    for y in masked.values():
        assert y.dtype == np.uint64 and y.shape == (length,) and int(y.max()) < 2**m
        assert chi_square_top_bits([y]) < 414.5
    # the test has power: the encoded inputs themselves are nowhere near uniform
    assert chi_square_top_bits([c.encoded for c in r.inputs.values()]) > 10_000

    limit = 6 / np.sqrt(length)  # ~6 standard errors of a correlation of independent vectors
    for i, y in masked.items():
        x = r.inputs[i].encoded
        signed = decode_signed(x, m).astype(np.float64)
        for reference in (signed, x.astype(np.float64)):
            corr = np.corrcoef(y.astype(np.float64), reference)[0, 1]
            assert abs(corr) < limit, (i, corr)
        assert np.mean(y == x) < 0.01  # and no coordinate passes through in the clear

    # identical inputs, different masked vectors
    assert np.array_equal(r.inputs[1].encoded, r.inputs[2].encoded)
    assert np.mean(masked[1] == masked[2]) < 0.01
    # ...and the round still sums exactly
    r.unmask()
    np.testing.assert_array_equal(r.server.finish(), r.plain_sum(r.inputs))


# ------------------------------------------------------------------------ tampering and replays


def test_tampered_share_is_named_and_the_round_completes() -> None:
    r = Round.start(10, seed=10)
    r.keys()
    r.mask()
    sender, receiver = 3, 8
    ct = bytearray(r.server.sealed[receiver][sender])
    ct[-1] ^= 0x01  # flip one bit of the GCM tag
    r.server.sealed[receiver][sender] = bytes(ct)
    r.unmask()
    assert r.reveals[receiver].tampered == [sender]
    assert sender not in r.reveals[receiver].self_seed_shares
    assert all(not r.reveals[i].tampered for i in r.reveals if i != receiver)
    assert receiver not in r.server.shares[sender]
    assert len(r.server.shares[sender]) >= r.params.threshold  # the others' shares suffice
    np.testing.assert_array_equal(r.server.finish(), r.plain_sum(r.inputs))


def test_a_session_refuses_messages_of_another_round_or_run() -> None:
    r = Round.start(6, seed=11)
    r.keys()
    r.mask()
    receiver = 1
    sealed = r.server.sealed_for(receiver)
    survivors = sorted(r.server.survivors)
    for change in ({"server_round": ROUND + 1}, {"run_id": RUN_ID + 1}, {"group": "phone"}):
        other = dataclasses.replace(r.params, **change)  # type: ignore[arg-type]
        with pytest.raises(ParameterError, match="does not belong to this device's round"):
            device_unmask(r.sessions[receiver], other, survivors, sealed, r.peers[receiver])
        with pytest.raises(ParameterError, match="does not belong to this device's round"):
            device_mask(r.sessions[receiver], other, r.peers[receiver], r.inputs[receiver].encoded)
    # the refusals consumed nothing: the right round still opens every share
    reveal = device_unmask(r.sessions[receiver], r.params, survivors, sealed, r.peers[receiver])
    assert reveal.tampered == [] and set(reveal.self_seed_shares) == set(sealed)


def test_share_keys_are_bound_to_run_and_round() -> None:
    """The share key's HKDF context holds run and round: a device that reused its X25519 keys
    in another round (Flamingo-style setup-once) still could not open this round's shares."""
    r = Round.start(6, seed=11)
    r.keys()
    r.mask()
    receiver = 1
    sealed = r.server.sealed_for(receiver)
    survivors = sorted(r.server.survivors)
    for change in ({"server_round": ROUND + 1}, {"run_id": RUN_ID + 1}):
        other = dataclasses.replace(r.params, **change)  # type: ignore[arg-type]
        reused = dataclasses.replace(r.sessions[receiver], params_digest=other.digest())
        reveal = device_unmask(reused, other, survivors, sealed, r.peers[receiver])
        assert reveal.tampered == sorted(sealed) and reveal.self_seed_shares == {}


def test_share_redirected_to_another_receiver_does_not_open() -> None:
    r = Round.start(6, seed=12)
    r.keys()
    r.mask()
    # the server swaps what 5 sent to 1 and what 5 sent to 2 (different pairwise keys)
    r.server.sealed[1][5], r.server.sealed[2][5] = r.server.sealed[2][5], r.server.sealed[1][5]
    r.unmask()
    assert r.reveals[1].tampered == [5] and r.reveals[2].tampered == [5]
    np.testing.assert_array_equal(r.server.finish(), r.plain_sum(r.inputs))


def test_a_share_reflected_to_its_sender_does_not_open() -> None:
    """The pairwise key of u and v is symmetric, so only the associated data (sender, receiver)
    tells the share u sealed for v from one v sealed for u. A server that hands u back the shares
    u dealt, as if its neighbours had sent them, would otherwise get u to open and reveal t
    shares of its own self-mask seed."""
    r = Round.start(6, seed=16)
    r.keys()
    r.mask()
    victim = 2
    reflected = {j: r.server.sealed[j][victim] for j in r.peers[victim]}  # what 2 sealed for each j
    reveal = device_unmask(
        r.sessions[victim], r.params, sorted(r.server.survivors), reflected, r.peers[victim]
    )
    assert reveal.tampered == sorted(reflected) and reveal.self_seed_shares == {}


# -------------------------------------------------------------------------- bad masked vectors


def test_bad_masked_vectors_are_rejected_and_count_as_vanished() -> None:
    r = Round.start(16, seed=13)  # t = 8: 11 survivors hold enough shares of each other
    r.keys()
    replies = {}
    for i in r.inputs:
        r.peers[i] = r.server.peer_keys_for(i)
        replies[i] = device_mask(r.sessions[i], r.params, r.peers[i], r.inputs[i].encoded)
    m = r.params.modulus_bits
    out_of_range = replies[4][1].copy()
    out_of_range[17] = np.uint64(1 << m)
    bad = {
        2: replies[2][1][:-1],  # one coordinate short
        3: np.concatenate([replies[3][1], replies[3][1][:1]]),  # one too many
        4: out_of_range,  # a residue outside [0, 2^m): would break the no-wrap guarantee
        5: replies[5][1].astype(np.int64),  # wrong dtype
        6: replies[6][1].reshape(-1, 1),  # not 1-D
    }
    for i, (sealed, y) in replies.items():
        before = None if r.server.masked_sum is None else r.server.masked_sum.copy()
        if i in bad:
            with pytest.raises(MaskedVectorError):
                r.server.add_masked(i, sealed, bad[i])
            assert i not in r.server.survivors
            # nothing of the rejected reply was kept
            if before is None:
                assert r.server.masked_sum is None
            else:
                np.testing.assert_array_equal(r.server.masked_sum, before)
            assert all(i not in by_sender for by_sender in r.server.sealed.values())
        else:
            r.server.add_masked(i, sealed, y)
    # a reply whose sealed shares are not addressed to exactly its neighbours is rejected too
    sealed7, y7 = replies[7]
    r2 = ServerRound(r.params, keys=dict(r.server.keys))
    with pytest.raises(ValueError, match="sealed shares"):
        r2.add_masked(7, {j: ct for j, ct in sealed7.items() if j != 1}, y7)
    assert r2.survivors == set() and r2.masked_sum is None

    assert r.server.vanished() == set(bad)
    r.unmask()
    good = sorted(set(r.inputs) - set(bad))
    total = r.server.finish()
    np.testing.assert_array_equal(total, r.plain_sum(good))
    _check_decoded(r, good, total)


def test_a_second_masked_vector_or_one_without_keys_is_refused() -> None:
    r = Round.start(6, seed=14)
    r.keys()
    replies = r.mask()
    sealed, y = replies[3]
    before = r.server.masked_sum.copy()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already"):
        r.server.add_masked(3, sealed, y)  # counted twice, it would silently corrupt the sum
    np.testing.assert_array_equal(r.server.masked_sum, before)
    # nor is a vector from a device that never sent keys (no one masked against it)
    stranger = ServerRound(r.params, keys={i: k for i, k in r.server.keys.items() if i != 3})
    with pytest.raises(ValueError, match="sent no keys"):
        stranger.add_masked(3, {}, y)
    assert stranger.masked_sum is None and stranger.survivors == set()
    r.unmask()
    np.testing.assert_array_equal(r.server.finish(), r.plain_sum(r.inputs))


def test_device_never_reveals_twice_in_a_round() -> None:
    r = Round.start(6, seed=15)
    r.keys()
    r.mask()
    survivors = sorted(r.server.survivors)
    first = device_unmask(r.sessions[1], r.params, survivors, r.server.sealed_for(1), r.peers[1])
    assert set(first.self_seed_shares) == set(survivors) - {1} and first.pair_seeds == {}
    # asked again with 2 "vanished", it would add its pairwise seed with 2 to 2's seed share
    with pytest.raises(ParameterError, match="already revealed"):
        device_unmask(r.sessions[1], r.params, [i for i in survivors if i != 2], {}, r.peers[1])


# ============================================================================ a lying server
# The server is played by the test itself: it builds whatever lists it likes, sends them to the
# real device steps, and keeps every reveal (it does not filter them as `ServerRound` does).


def _reveals_under(r: Round, lists: dict[int, list[int]]) -> tuple[dict[int, Reveal], dict[int, str]]:
    """Show device i the survivor list lists[i]; keep what each reveals or why it refused."""
    reveals, refusals = {}, {}
    for i, survivors in lists.items():
        sealed = {j: r.server.sealed[i][j] for j in r.server.sealed.get(i, {})}
        try:
            reveals[i] = device_unmask(r.sessions[i], r.params, survivors, sealed, r.peers[i])
        except ParameterError as exc:
            refusals[i] = str(exc)
    return reveals, refusals


def _exposed(r: Round, reveals: dict[int, Reveal], u: int) -> bool:
    """Whether the reveals hand over u's self-mask seed AND every pairwise seed of u's vector."""
    shares = {h: rv.self_seed_shares[u] for h, rv in reveals.items() if u in rv.self_seed_shares}
    if len(shares) < r.params.threshold or combine(shares, r.params.threshold) != r.sessions[u].self_seed:
        return False
    return all(
        v in reveals.get(u, Reveal()).pair_seeds or u in reveals.get(v, Reveal()).pair_seeds
        for v in r.peers[u]
    )


def test_attack_fake_ids_and_all_neighbours_vanished_is_refused() -> None:
    """Issue attack 1: tell the target 'survivors = [you, two ids that do not exist]' (all its
    neighbours vanished) and everyone else the truth."""
    r = Round.start(10, seed=20)
    r.keys()
    r.mask()
    target, honest = 1, sorted(r.server.survivors)
    for lie, why in (
        ([target, 98, 99], "not members of this group"),
        ([target], "only 0 of this device's 9"),
    ):
        lists = {i: honest for i in honest} | {target: lie}
        reveals, refusals = _reveals_under(r, lists)
        assert why in refusals[target] and set(refusals) == {target}
        assert not _exposed(r, reveals, target)
        r.sessions = {i: dataclasses.replace(s, revealed=False) for i, s in r.sessions.items()}  # try again
    # told the truth, the same devices complete the round
    r.unmask()
    np.testing.assert_array_equal(r.server.finish(), r.plain_sum(r.inputs))


def test_attack_consistent_list_on_a_sparse_graph_is_refused() -> None:
    """Issue attack 2: one consistent list for everyone, 'the target's neighbours vanished'.
    Before the checks the target revealed every pairwise seed while its 'vanished' neighbours
    still answered with shares of its self-mask seed."""
    params = _params(40, dropout_rate=0.05)
    r = Round.start(40, seed=21, params=params)
    r.keys()
    r.mask()
    target = 1
    lie = sorted(set(r.inputs) - r.params.graph()[target])
    reveals, refusals = _reveals_under(r, dict.fromkeys(r.inputs, lie))
    assert "below the threshold" in refusals[target]
    assert all("not listed as a survivor" in refusals[v] for v in r.params.graph()[target])
    assert not any(target in rv.self_seed_shares for rv in reveals.values())
    assert not _exposed(r, reveals, target)


def _split_lists(n: int) -> tuple[dict[int, list[int]], set[int], set[int]]:
    """Inconsistent lists on the complete graph of 10 (k = 9, t = 5) aimed at devices 1 and 2."""
    everyone = list(range(1, n + 1))
    a, b = {3, 4, 5, 6}, {7, 8, 9, 10}
    lists = {1: [1, 2, *sorted(a)], 2: [1, 2, *sorted(a)]}
    lists |= {i: sorted(set(everyone) - {1, 2}) for i in a} | {i: everyone for i in b}
    return lists, a, b


def test_inconsistent_lists_without_certified_keys_cannot_unmask_one_device() -> None:
    """Each device checks only its own list, so different devices may be told different things;
    still no single honest device is exposed (it reveals at most k - t < t pairwise seeds). What
    such a server *can* get without the consistency check is documented and shown here: the sum of
    two neighbours whose shared mask cancels (docs: 'Malicious server, without certified keys')."""
    r = Round.start(10, seed=22)
    r.keys()
    r.mask()
    lists, a, b = _split_lists(10)
    reveals, refusals = _reveals_under(r, lists)
    assert refusals == {}  # every list passes the device's own checks
    assert not any(_exposed(r, reveals, u) for u in r.inputs)
    # the known limit: x_1 + x_2 comes out (b_1, b_2 from 2 + B / 1 + B; seeds with A from A)
    held = {
        u: {h: rv.self_seed_shares[u] for h, rv in reveals.items() if u in rv.self_seed_shares}
        for u in (1, 2)
    }
    seeds = {u: combine(held[u], r.params.threshold) for u in (1, 2)}
    edges = [(u, v, reveals[u].pair_seeds[v]) for u in (1, 2) for v in b]
    edges += [(u, v, reveals[v].pair_seeds[u]) for u in (1, 2) for v in a]
    y = {i: masked for i, (_, masked) in r.replies.items()}
    pair = unmask_sum(y[1] + y[2], seeds, edges, r.params.modulus_bits, r.params.context("mask"))
    np.testing.assert_array_equal(pair, r.plain_sum([1, 2]))


def test_parameter_downgrades_are_refused_before_anything_is_drawn() -> None:
    params = _params(10)
    expected = expected_for(params)
    m = params.modulus_bits
    for change, why in (
        ({"threshold": 1}, "threshold 1 is outside"),
        ({"threshold": 4}, "threshold 4 is outside"),  # floor(9/2) + 1 = 5
        ({"degree": 2, "threshold": 2}, "degree 2 is outside"),  # a sparse graph for 10 devices
        ({"n": 2, "degree": 1, "threshold": 1}, "below secagg-min-devices"),
        ({"modulus_bits": m - 8}, "is not the no-wrap modulus"),
        ({"modulus_bits": 64}, "is not the no-wrap modulus"),
        ({"modulus_bits": 99}, "out of range"),
        ({"clip": 1000.0}, "differ from this device's"),
        ({"max_weight": 10**9}, "differ from this device's"),
        ({"group": "phone"}, "is not this device's task"),
        ({"run_id": RUN_ID + 1}, "is not this device's run"),
        ({"graph_seed": b"short"}, "graph seed"),
    ):
        with pytest.raises(ParameterError, match=why):
            device_keys(dataclasses.replace(params, **change), 1, expected)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"outside 1\.\.10"):
        device_keys(params, 11, expected)
    device_keys(params, 10, expected)  # the honest parameters are accepted


def test_low_order_and_repeated_keys_are_refused_by_server_and_device() -> None:
    r = Round.start(6, seed=23)
    r.keys([1, 2, 3, 4, 5])
    session, c_pk, s_pk = device_keys(r.params, 6, expected_for(r.params))
    for bad in (bytes(32), (1).to_bytes(32, "little")):  # low-order points: all-zero shared secret
        with pytest.raises(ValueError, match="invalid X25519 public key"):
            r.server.add_keys(6, bad, s_pk)
    with pytest.raises(ValueError, match="repeat"):
        r.server.add_keys(6, c_pk, r.server.keys[1][1])  # a copy of device 1's s key
    assert 6 not in r.server.keys  # refused: counted as never arrived, nobody masks with it
    r.sessions[6] = session
    peers = r.server.peer_keys_for(6)
    # a lying server forwards a low-order key, or one key for two neighbours (their masks would cancel)
    for forged, why in (
        (peers | {2: (bytes(32), peers[2][1])}, "neighbour 2's public key is invalid"),
        (peers | {3: (peers[3][0], peers[2][1])}, "repeats another key"),
        (peers | {7: peers[2]}, "not our neighbours"),
    ):
        with pytest.raises(ParameterError, match=why):
            device_mask(session, r.params, forged, r.inputs[6].encoded)
    assert session.masked_with == ()  # nothing was sent


def test_a_false_share_is_blamed_on_its_holder_and_the_round_completes() -> None:
    r = Round.start(10, seed=24)
    r.keys()
    r.mask()
    r.unmask()
    liar, owner = 7, 3
    share = bytearray(r.server.shares[owner][liar])
    share[-1] ^= 1
    r.server.shares[owner][liar] = bytes(share)
    np.testing.assert_array_equal(r.server.finish(), r.plain_sum(r.inputs))
    assert set(r.server.blamed) == {liar} and f"device {owner}'s self-mask" in r.server.blamed[liar]


def test_inconsistent_shares_from_their_dealer_abort_naming_the_dealer() -> None:
    r = Round.start(6, seed=25)
    r.keys()
    r.mask()
    r.unmask()
    owner = 4
    held = r.server.shares[owner]
    other = split(secrets.token_bytes(32), r.params.threshold, sorted(held))
    for h in sorted(held)[:2]:  # two holders' shares come from another polynomial
        held[h] = other[h]
    with pytest.raises(SecAggAbort, match=f"device {owner} dealt inconsistent shares") as info:
        r.server.finish()
    assert info.value.blame == (owner,)


# ============================================================== certified keys (run config secagg-pki)


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = [f"device-{i}" for i in range(1, 11)] + ["mallory"]
    return pki.create_fleet_pki(tmp_path_factory.mktemp("pki"), names)


@dataclass
class CertifiedRound:
    """A Round whose devices hold CA-certified keys and run the consistency check."""

    r: Round
    ca: bytes
    creds: dict[int, pki.DeviceCredential]
    identities: dict[int, dict[int, bytes]] = field(default_factory=dict)
    endorsements: dict[int, bytes] = field(default_factory=dict)  # everything the server collected

    @classmethod
    def start(cls, root: Path, n: int, seed: int) -> CertifiedRound:
        r = Round.start(n, seed)
        ca = pki.load_ca_public(root)
        r.server = ServerRound(r.params, ca_public=ca)
        return cls(r, ca, {i: pki.load_credential(root, f"device-{i}") for i in range(1, n + 1)})

    def signed_keys(self, i: int, c_pk: bytes, s_pk: bytes, cred: pki.DeviceCredential | None = None):
        cred = cred or self.creds[i]
        statement = pki.round_keys_statement(self.r.params.digest(), i, c_pk, s_pk)
        return cred.certificate, pki.sign(cred.private, statement)

    def keys(self) -> None:
        for i in self.r.inputs:
            session, c_pk, s_pk = device_keys(self.r.params, i, expected_for(self.r.params))
            self.r.sessions[i] = session
            self.r.server.add_keys(i, c_pk, s_pk, self.signed_keys(i, c_pk, s_pk))

    def mask(self) -> None:
        r = self.r
        for i in sorted(r.sessions):
            r.peers[i] = r.server.peer_keys_for(i)
            self.identities[i] = check_peer_keys(
                r.sessions[i], r.params, r.peers[i], ca_public=self.ca,
                credentials=r.server.peer_credentials_for(i), my_certificate=self.creds[i].certificate,
            )  # fmt: skip
            sealed, masked = device_mask(r.sessions[i], r.params, r.peers[i], r.inputs[i].encoded)
            r.server.add_masked(i, sealed, masked)

    def run(self, lists: dict[int, list[int]]) -> tuple[dict[int, Reveal], dict[int, str]]:
        """Show each device its list, collect signatures, hand every device all of them."""
        r = self.r
        for i, survivors in lists.items():
            self.endorsements[i] = device_endorse(r.sessions[i], r.params, survivors, self.creds[i].private)
        reveals, refusals = {}, {}
        for i, survivors in lists.items():
            try:
                reveals[i] = device_unmask(
                    r.sessions[i], r.params, survivors, r.server.sealed_for(i), r.peers[i],
                    endorsements=self.endorsements, identities=self.identities[i],
                )  # fmt: skip
            except ParameterError as exc:
                refusals[i] = str(exc)
        return reveals, refusals


def test_certified_round_with_the_consistency_check_sums_exactly(fleet_pki: Path) -> None:
    c = CertifiedRound.start(fleet_pki, 10, seed=30)
    c.keys()
    c.mask()
    survivors = sorted(c.r.server.survivors)
    for i in survivors:  # the server's own path: it verifies each signature as it arrives
        c.r.server.add_endorsement(
            i, device_endorse(c.r.sessions[i], c.r.params, survivors, c.creds[i].private)
        )
    for i in survivors:
        reveal = device_unmask(
            c.r.sessions[i], c.r.params, survivors, c.r.server.sealed_for(i), c.r.peers[i],
            endorsements=c.r.server.endorsements_for(i), identities=c.identities[i],
        )  # fmt: skip
        c.r.server.add_reveal(i, reveal)
    np.testing.assert_array_equal(c.r.server.finish(), c.r.plain_sum(c.r.inputs))


def test_certified_devices_refuse_inconsistent_lists(fleet_pki: Path) -> None:
    """The lists that leak x_1 + x_2 without certified keys: every device signs what it is shown,
    and then finds fewer than t of its neighbours signed the same set, so none reveals anything."""
    c = CertifiedRound.start(fleet_pki, 10, seed=31)
    c.keys()
    c.mask()
    lists, _, _ = _split_lists(10)
    reveals, refusals = c.run(lists)
    assert reveals == {} and set(refusals) == set(lists)
    assert all("signed this survivor set" in why for why in refusals.values())
    # the honest consistent set is still refused: each device signs once per round
    with pytest.raises(ParameterError, match="already endorsed"):
        device_endorse(c.r.sessions[1], c.r.params, list(range(1, 11)), c.creds[1].private)


def test_certified_devices_refuse_substituted_keys_sybils_and_replays(
    fleet_pki: Path, tmp_path: Path
) -> None:
    c = CertifiedRound.start(fleet_pki, 6, seed=32)
    c.keys()
    r, target = c.r, 1
    peers, creds = r.server.peer_keys_for(target), r.server.peer_credentials_for(target)
    mine = c.creds[target].certificate

    def attempt(p: dict, k: dict, why: str) -> None:
        with pytest.raises(ParameterError, match=why):
            check_peer_keys(
                r.sessions[target], r.params, p, ca_public=c.ca, credentials=k, my_certificate=mine
            )

    # the server's own keys for neighbour 2 (a man in the middle), under 2's certificate and signature
    _, mitm_c, mitm_s = device_keys(r.params, 2, expected_for(r.params))
    attempt(peers | {2: (mitm_c, mitm_s)}, creds, "neighbour 2's keys are not signed")
    # ...or signed by a key its own CA certified
    rogue = pki.load_credential(pki.create_fleet_pki(tmp_path / "rogue", ["device-2"]), "device-2")
    attempt(
        peers | {2: (mitm_c, mitm_s)}, creds | {2: c.signed_keys(2, mitm_c, mitm_s, rogue)}, "not signed by"
    )
    # one certified device (mallory, colluding) signing for two positions: a Sybil
    mallory = pki.load_credential(fleet_pki, "mallory")
    sybil = dict(creds)
    for j in (2, 3):
        sybil[j] = c.signed_keys(j, *peers[j], mallory)
    attempt(peers, sybil, "appears twice")
    # keys signed for another round do not verify in this one
    other = dataclasses.replace(r.params, server_round=ROUND + 1)
    stale = pki.sign(c.creds[2].private, pki.round_keys_statement(other.digest(), 2, *peers[2]))
    attempt(peers, creds | {2: (c.creds[2].certificate, stale)}, "neighbour 2's keys are not signed")
    attempt(peers, {}, "without them")
    # the server refuses the Sybil too: one certified name, one position
    with pytest.raises(ValueError, match="already holds position"):
        ServerRound(r.params, ca_public=c.ca, names={"mallory": 2}).add_keys(3, *peers[3], sybil[3])
    assert check_peer_keys(
        r.sessions[target], r.params, peers, ca_public=c.ca, credentials=creds, my_certificate=mine
    ) == {j: c.creds[j].public() for j in peers}


def test_certified_device_will_not_unmask_an_unsigned_set(fleet_pki: Path) -> None:
    c = CertifiedRound.start(fleet_pki, 6, seed=33)
    c.keys()
    c.mask()
    r, survivors = c.r, sorted(c.r.server.survivors)
    with pytest.raises(ParameterError, match="never endorsed"):
        device_unmask(
            r.sessions[1], r.params, survivors, {}, r.peers[1], endorsements={}, identities=c.identities[1]
        )
    device_endorse(r.sessions[1], r.params, survivors, c.creds[1].private)
    with pytest.raises(ParameterError, match="differs from the one this device signed"):
        device_unmask(
            r.sessions[1],
            r.params,
            survivors[:-1],
            {},
            r.peers[1],
            endorsements={},
            identities=c.identities[1],
        )
    with pytest.raises(ParameterError, match="signed this survivor set"):
        device_unmask(
            r.sessions[1], r.params, survivors, {}, r.peers[1], endorsements={}, identities=c.identities[1]
        )


# ======================================================================== hostile devices


def _slot(params: Params, key: str) -> slice:
    """Where `key` lies in the encoded vector (vector.py's layout: sorted expected keys)."""
    offset = 0
    for name, shape in sorted(exact_mixed_rank.expected_shapes(SHAPES).items()):
        size = int(np.prod(shape))
        if name == key:
            return slice(offset, offset + size)
        offset += size
    raise KeyError(key)


def _hostile_round(seed: int, tamper) -> tuple[Round, dict[str, np.ndarray]]:
    """A 10-device round in which device 3's encoded input is replaced by tamper(its input)."""
    r = Round.start(10, seed=seed)
    r.inputs[3] = dataclasses.replace(r.inputs[3], encoded=tamper(r.inputs[3].encoded.copy(), r.params))
    r.keys()
    r.mask()
    r.unmask()
    return r, decode_total(RULE, r.server.finish(), SHAPES, r.params)


HEAD, B = "head.out.bias", "lora.conv2.lora_B.weight"


def _set_weight(x: np.ndarray, params: Params, value: int) -> np.ndarray:
    for key in SHAPES:
        s = _slot(params, key + exact_mixed_rank.WEIGHT)
        width = s.stop - s.start
        x[s] = encode_integers(np.full(width, value, dtype=np.int64), params.modulus_bits)
    return x


@pytest.mark.parametrize(
    ("tamper", "check"),
    [
        # a coordinate far beyond clip x weight (no clipping on a hostile device)
        (lambda x, p: _add(x, p, HEAD, 2 ** (p.modulus_bits - 3)), "value-bound"),
        # a negative weight (it froze a task silently: keys with weight <= 0 were skipped)
        (lambda x, p: _set_weight(x, p, -50), "value-bound"),  # W stays positive: values exceed clip x W
        (lambda x, p: _set_weight(x, p, -10 * MAX_WEIGHT), "weight-range"),  # W <= 0
        # a weight far above max-weight
        (lambda x, p: _set_weight(x, p, 10 * MAX_WEIGHT * 10), "weight-range"),
        # a weight on one key only
        (lambda x, p: _add(x, p, HEAD + exact_mixed_rank.WEIGHT, 7), "weights-consistent"),
        # weights on B's last column without its first
        (lambda x, p: _add(x, p, B + exact_mixed_rank.WEIGHT, 0, last=100), "non-increasing"),
    ],
)
def test_hostile_inputs_fail_the_plausibility_check(tamper, check: str) -> None:
    r, decoded = _hostile_round(40, tamper)
    with pytest.raises(ImplausibleSumError, match=check):
        check_plausible_sum(RULE, decoded, SHAPES, r.params, len(r.server.survivors))


def _add(x: np.ndarray, params: Params, key: str, value: int, *, last: int = 0) -> np.ndarray:
    s = _slot(params, key)
    mask = np.uint64((1 << params.modulus_bits) - 1)
    x[s.start] = (x[s.start] + np.uint64(value)) & mask
    x[s.stop - 1] = (x[s.stop - 1] + np.uint64(last)) & mask
    return x


def test_honest_sum_passes_and_a_careful_hostile_device_is_bounded_only_by_clip() -> None:
    r, decoded = _hostile_round(41, lambda x, p: x)
    total = check_plausible_sum(RULE, decoded, SHAPES, r.params, len(r.server.survivors))
    assert total == sum(c.weight for c in r.inputs.values())
    # the known limit (ACORN / RoFL): device 3 sets one coordinate so that the *sum* is exactly
    # clip x W; no check can tell it from an honest round where every device pushed to +clip
    s = _slot(r.params, HEAD)
    scale = (2 ** (VALUE_BITS - 1) - 1) / CLIP
    honest_rest = round(float(decoded[HEAD][0]) * scale) - int(
        decode_signed(r.inputs[3].encoded[s][:1], r.params.modulus_bits)[0]
    )

    def push(x: np.ndarray, p: Params) -> np.ndarray:
        target = round(CLIP * scale * total) - honest_rest
        x[s.start] = encode_integers(np.array([target], dtype=np.int64), p.modulus_bits)[0]
        return x

    r2 = Round.start(10, seed=41)  # the same inputs (same seed): only device 3 differs
    r2.inputs[3] = dataclasses.replace(r2.inputs[3], encoded=push(r.inputs[3].encoded.copy(), r.params))
    for i in r2.inputs:
        if i != 3:
            r2.inputs[i] = r.inputs[i]
    r2.keys()
    r2.mask()
    r2.unmask()
    pushed = decode_total(RULE, r2.server.finish(), SHAPES, r2.params)
    assert check_plausible_sum(RULE, pushed, SHAPES, r2.params, 10) == total
    assert pushed[HEAD][0] / total == pytest.approx(CLIP, rel=1e-6)  # the mean moved to +clip


def test_a_bogus_revealed_seed_is_caught_by_the_plausibility_check() -> None:
    r = Round.start(10, seed=42)
    r.keys()
    r.mask([i for i in r.inputs if i != 9])  # 9 vanishes after keys: survivors reveal seeds with it
    r.unmask()
    liar = 4
    r.server.pair_seeds[(liar, 9)] = secrets.token_bytes(32)  # what a hostile survivor reveals
    decoded = decode_total(RULE, r.server.finish(), SHAPES, r.params)
    with pytest.raises(ImplausibleSumError):
        check_plausible_sum(RULE, decoded, SHAPES, r.params, len(r.server.survivors))


@pytest.mark.parametrize("n", [3, 4, 10, 50, 101, 150, 300])
def test_devices_accept_every_honest_plan(n: int) -> None:
    """The server's own plan passes every device check, sparse graphs (n > 100) included."""
    from federation.secagg.protocol import check_params

    params = _params(n)
    check_params(params, Expected(RUN_ID, GROUP, CLIP, VALUE_BITS, MAX_WEIGHT, min_devices=3))
    assert params.degree // 2 + 1 == params.threshold and (params.degree < n - 1) == (n >= 150)
