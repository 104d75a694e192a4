"""Tests for the pure secure-aggregation math in `federation.secagg`.

Covers Shamir sharing, fixed-point encoding, masking, the SecAgg+ graph and share envelopes, and
simulates one full round of SecAgg+ (Bell et al., CCS 2020) with the dropout recovery of SecAgg
(Bonawitz et al., CCS 2017) as pure function calls: the unmasked sum must equal the plaintext
modular sum of the survivors exactly.
"""

from __future__ import annotations

import ast
import itertools
import math
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from federation.secagg import (
    MaskedVectorError,
    TamperedShareError,
    agree,
    check_masked_vector,
    combine,
    decode_signed,
    decode_sum,
    encode,
    encode_integers,
    mask_vector,
    masked_input,
    modulus_bits,
    neighbours,
    open_,
    pack_fields,
    quantization_error_bound,
    recommended_degree,
    recommended_threshold,
    round_context,
    scale_for,
    seal,
    share_aad,
    split,
    unmask_sum,
)
from federation.secagg.shamir import PRIME

SECAGG_DIR = Path(__file__).resolve().parents[2] / "federation" / "secagg"


def _counter_rng(seed: int) -> Callable[[int], bytes]:
    """Deterministic byte source for reproducible rounding in tests (not for production)."""
    state = {"n": 0}

    def rng(n: int) -> bytes:
        out = mask_vector(seed.to_bytes(32, "big"), n // 8 + 1, 64, pack_fields(state["n"]))
        state["n"] += 1
        return out.tobytes()[:n]

    return rng


# --------------------------------------------------------------------------------------------- Shamir


def test_shamir_every_subset_of_threshold_or_more_recovers() -> None:
    secret = secrets.token_bytes(32)
    ids = [1, 2, 3, 4, 5, 6]
    shares = split(secret, 3, ids)
    assert set(shares) == set(ids)
    for size in range(3, len(ids) + 1):
        for subset in itertools.combinations(ids, size):
            assert combine({i: shares[i] for i in subset}, 3) == secret


def test_shamir_multichunk_secret_with_leading_zeros_and_large_ids() -> None:
    # 100 bytes -> two chunks (64 + 36); leading zeros must survive; 64-bit node ids as points.
    secret = b"\x00\x00" + secrets.token_bytes(98)
    ids = [2**64 - 1, 7, 12345678901234567, 3, 99, 2**40, 5]
    shares = split(secret, 4, ids)
    for subset in itertools.combinations(ids, 4):
        assert combine({i: shares[i] for i in subset}, 4) == secret


def test_shamir_fewer_than_threshold_fails_clearly() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 4, range(1, 8))
    few = {i: shares[i] for i in (1, 2, 3)}
    with pytest.raises(ValueError, match=r"not enough shares.*got 3.*threshold=4"):
        combine(few, 4)
    # Lying about the threshold does not help: t-1 points of a degree t-1 polynomial interpolate
    # to a uniform field element, outside a 256-bit secret's range but with probability 2^-265.
    with pytest.raises(ValueError, match="out of range"):
        combine(few, 3)


def test_shamir_edge_thresholds_and_bad_inputs() -> None:
    secret = secrets.token_bytes(32)
    one = split(secret, 1, [1, 2])
    assert one[1] == one[2]  # threshold 1: every share is the secret itself
    assert combine(split(secret, 1, [9]), 1) == secret
    full = split(secret, 5, range(1, 6))
    assert combine(full, 5) == secret
    with pytest.raises(ValueError, match="nonzero"):
        split(secret, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="nonzero"):
        split(secret, 2, [1, PRIME])
    with pytest.raises(ValueError, match="distinct"):
        split(secret, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="exceeds"):
        split(secret, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        split(b"", 1, [1])
    with pytest.raises(ValueError, match="malformed"):
        combine({1: full[1][:-1], 2: full[2], 3: full[3]}, 2)


def test_shamir_extra_share_from_another_secret_is_detected() -> None:
    a = split(secrets.token_bytes(32), 3, range(1, 6))
    b = split(secrets.token_bytes(32), 3, range(1, 6))
    mixed = {1: a[1], 2: a[2], 3: a[3], 4: b[4]}
    with pytest.raises(ValueError, match="inconsistent"):
        combine(mixed, 3)


# --------------------------------------------------------------------------------------- quantization


def test_modulus_bits_formula_and_limit() -> None:
    assert modulus_bits(16, 1, 0) == 17
    assert modulus_bits(16, 50, 10) == 16 + 6 + 10 + 1
    assert modulus_bits(16, 64, 10) == 16 + 6 + 10 + 1  # ceil(log2 64) == 6
    assert modulus_bits(16, 65, 10) == 16 + 7 + 10 + 1
    with pytest.raises(ValueError, match="64"):
        modulus_bits(40, 200, 20)


def test_quantize_round_trip_within_bound() -> None:
    n, length, clip, vbits, wbits = 20, 5000, 0.5, 20, 12
    m = modulus_bits(vbits, n, wbits)
    rng = _counter_rng(1)
    xs = [np.sin(np.arange(length) * (k + 1)) * 0.8 for k in range(n)]  # some beyond clip
    weights = [int(w) for w in np.linspace(1, 2**wbits - 1, n)]
    acc = np.zeros(length, dtype=np.uint64)
    for x, w in zip(xs, weights, strict=True):
        acc += encode(x, clip, vbits, m, rng, weight=w)
    acc &= np.uint64(2**m - 1)
    decoded = decode_sum(acc, clip, vbits, m)
    true = sum(w * np.clip(x, -clip, clip) for x, w in zip(xs, weights, strict=True))
    bound = quantization_error_bound(clip, vbits, n, max_weight=max(weights))
    assert np.max(np.abs(decoded - true)) <= bound
    # The weighted mean is within one quantum regardless of n.
    mean_err = np.abs(decoded / sum(weights) - true / sum(weights))
    assert np.max(mean_err) < quantization_error_bound(clip, vbits, 1)


def test_stochastic_rounding_is_unbiased_and_negative_values_decode() -> None:
    clip, vbits, m = 1.0, 8, 16
    scale = scale_for(clip, vbits)
    value = -(3.3 / scale)  # between two grid points: q is -3 w.p. 0.7, -4 w.p. 0.3
    enc = encode(np.full(200_000, value), clip, vbits, m)
    q = decode_signed(enc, m)
    assert set(np.unique(q)) == {-4, -3}
    assert abs(q.mean() - (-3.3)) < 0.01  # std of the mean ~0.001
    assert np.all(enc < 2**m)


def test_extremes_fill_the_modulus_without_wrapping() -> None:
    # Every client at +clip (or -clip) with the largest weight: the sum must not wrap, m < 64 and m == 64.
    for vbits, n, wbits in ((8, 5, 3), (20, 33, 10), (30, 16, 29)):
        m = modulus_bits(vbits, n, wbits)
        for sign in (1.0, -1.0):
            x = np.array([sign * 2.0, sign * 1.0, 0.0])
            w = 2**wbits  # one above the nominal range: the guard bit absorbs it
            acc = np.zeros(3, dtype=np.uint64)
            for _ in range(n):
                acc += encode(x, 1.0, vbits, m, weight=w)
            if m < 64:
                acc &= np.uint64(2**m - 1)
            expected = sign * n * w * (2 ** (vbits - 1) - 1)
            assert decode_signed(acc, m)[0] == expected
            assert decode_signed(acc, m)[1] == expected


def test_encode_rejects_bad_input_and_integers_round_trip() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode(np.array([0.0, np.nan]), 1.0, 16, 32)
    with pytest.raises(ValueError, match="weight"):
        encode(np.zeros(2), 1.0, 16, 20, weight=2**8)
    x = np.full(50, 0.1)
    # Same byte source -> same rounding (reproducible tests).
    assert np.array_equal(encode(x, 1.0, 16, 32, _counter_rng(7)), encode(x, 1.0, 16, 32, _counter_rng(7)))
    for m in (17, 63, 64):
        v = np.array([0, 1, -1, 2 ** (m - 1) - 1, -(2 ** (m - 1))], dtype=np.int64)
        assert np.array_equal(decode_signed(encode_integers(v, m), m), v)
    with pytest.raises(ValueError):
        encode_integers(np.array([2**20]), 21)
    with pytest.raises(ValueError, match="out of range"):
        decode_signed(np.array([2**20], dtype=np.uint64), 20)


# ------------------------------------------------------------------------------------------- masking


def test_agree_is_symmetric_and_context_bound() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ctx = round_context("run-1", 3, "mask")
    s_ab = agree(a, b.public_key().public_bytes_raw(), ctx)
    assert s_ab == agree(b, a.public_key().public_bytes_raw(), ctx)
    assert len(s_ab) == 32
    assert s_ab != agree(a, b.public_key().public_bytes_raw(), round_context("run-1", 4, "mask"))
    assert s_ab != agree(a, b.public_key().public_bytes_raw(), round_context("run-2", 3, "mask"))
    assert s_ab != agree(a, b.public_key().public_bytes_raw(), round_context("run-1", 3, "encrypt"))


def test_mask_vector_deterministic_in_range_and_context_separated() -> None:
    seed = secrets.token_bytes(32)
    ctx = round_context("r", 1, "mask")
    for m in (1, 20, 63, 64):
        v = mask_vector(seed, 1000, m, ctx)
        assert v.dtype == np.uint64 and v.shape == (1000,)
        assert np.array_equal(v, mask_vector(seed, 1000, m, ctx))
        if m < 64:
            assert int(v.max()) < 2**m
    assert not np.array_equal(mask_vector(seed, 100, 64, ctx), mask_vector(seed, 100, 64, ctx + b"x"))
    # A longer vector extends a shorter one (same keystream), across the internal slice boundary.
    long = mask_vector(seed, (1 << 17) + 5, 64, ctx)
    assert np.array_equal(long[:1000], mask_vector(seed, 1000, 64, ctx))
    assert mask_vector(seed, 0, 32, ctx).shape == (0,)


def test_pack_fields_is_injective() -> None:
    assert pack_fields("a1", 2) != pack_fields("a", 12)
    assert pack_fields(b"x", "y") != pack_fields("x", b"y")
    assert round_context("run", 1, "mask") != round_context("run", 1, "encrypt")
    assert share_aad("run", 1, 2, 3) != share_aad("run", 1, 3, 2)
    with pytest.raises(TypeError):
        pack_fields(True)


@pytest.mark.parametrize(("n", "degree", "m"), [(10, 9, 40), (20, 10, 64), (20, 10, 33), (12, 6, 48)])
def test_masks_cancel_and_unmask_sum_removes_survivors_and_dropped_masks(n: int, degree: int, m: int) -> None:
    """The masking algebra the protocol relies on: over the survivors, pairwise masks between
    survivors cancel, and `unmask_sum` removes the self masks and the masks survivors share with
    the dropped, given (survivor, dropped, seed) for every such edge (the production protocol's
    rounds, with shares and reveals, are in test_secagg_protocol.py)."""
    length, ctx = 2000, round_context("run-x", 7, "mask")
    ids = list(range(1, n + 1))
    graph = neighbours(ids, degree, b"graph-seed-1")
    keys = {i: X25519PrivateKey.generate() for i in ids}
    public = {i: k.public_key().public_bytes_raw() for i, k in keys.items()}
    seeds = {i: secrets.token_bytes(32) for i in ids}
    x = {i: encode_integers(np.arange(length, dtype=np.int64) * i - 1000 * i, m) for i in ids}
    pair = {i: {j: agree(keys[i], public[j], ctx) for j in graph[i]} for i in ids}
    dropped = set(ids[-round(0.3 * n) :])
    survivors = [i for i in ids if i not in dropped]
    total = np.zeros(length, dtype=np.uint64)
    for i in survivors:
        total += masked_input(x[i], seeds[i], pair[i], i, m, ctx)
    edges = [(i, j, pair[i][j]) for i in survivors for j in sorted(graph[i] & dropped)]
    plain = np.zeros(length, dtype=np.uint64)
    for i in survivors:
        plain += x[i]
    if m < 64:
        plain &= np.uint64(2**m - 1)
    np.testing.assert_array_equal(unmask_sum(total, {i: seeds[i] for i in survivors}, edges, m, ctx), plain)
    # one missing edge or self seed leaves a mask in: the result is then nowhere near the sum
    assert edges
    wrong = unmask_sum(total, {i: seeds[i] for i in survivors}, edges[1:], m, ctx)
    assert np.mean(wrong == plain) < 0.01
    wrong = unmask_sum(total, {i: seeds[i] for i in survivors[1:]}, edges, m, ctx)
    assert np.mean(wrong == plain) < 0.01


def test_masked_vectors_look_uniform_and_uncorrelated() -> None:
    m, length = 32, 20_000
    # Fixed seeds keep the statistical thresholds below from ever flaking.
    seed_pair, seed_self = bytes(range(32)), bytes(range(32, 64))
    ctx = round_context("run", 1, "mask")
    # A highly structured input: a ramp that is strongly correlated with itself and far from uniform.
    x = encode_integers(np.arange(length, dtype=np.int64) % 1000, m)
    y = masked_input(x, seed_self, {2: seed_pair}, 1, m, ctx)
    u = y.astype(np.float64) / 2.0**m
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.01
    top = (y >> np.uint64(m - 4)).astype(np.int64)  # top 4 bits: 16 equiprobable bins
    counts = np.bincount(top, minlength=16)
    chi2 = float(((counts - length / 16) ** 2 / (length / 16)).sum())
    assert chi2 < 45.0  # 15 degrees of freedom; p ~ 1e-4
    low = (y & np.uint64(0xF)).astype(np.int64)  # low bits too (where the input lives)
    chi2_low = float(((np.bincount(low, minlength=16) - length / 16) ** 2 / (length / 16)).sum())
    assert chi2_low < 45.0
    r = np.corrcoef(u, x.astype(np.float64))[0, 1]
    assert abs(r) < 5 / math.sqrt(length)


def test_check_masked_vector_rejects_malformed_uploads() -> None:
    edge = np.full(10, 2**16 - 1, dtype=np.uint64)  # the largest residue mod 2^16 is accepted...
    np.testing.assert_array_equal(check_masked_vector(edge, 10, 16), edge)
    good = np.zeros(10, dtype=np.uint64)
    with pytest.raises(MaskedVectorError, match="length"):
        check_masked_vector(good[:9], 10, 16)
    with pytest.raises(MaskedVectorError, match="outside"):  # ...and one more is not
        check_masked_vector(np.full(10, 2**16, dtype=np.uint64), 10, 16)
    with pytest.raises(MaskedVectorError, match="dtype"):
        check_masked_vector(np.zeros(10, dtype=np.int64), 10, 16)
    with pytest.raises(MaskedVectorError, match="1-D"):
        check_masked_vector(np.zeros((2, 5), dtype=np.uint64), 10, 16)
    assert issubclass(MaskedVectorError, ValueError)


# ------------------------------------------------------------------------------------------ envelope


def test_envelope_round_trip_and_tampering_rejected() -> None:
    key = secrets.token_bytes(32)
    aad = share_aad("run-a", 5, 1, 2)
    box = seal(key, b"share bundle", aad)
    assert open_(key, box, aad) == b"share bundle"
    assert seal(key, b"share bundle", aad) != box  # fresh nonce each time
    for pos in (0, 12, len(box) - 1):  # nonce, ciphertext, tag
        bad = bytearray(box)
        bad[pos] ^= 1
        with pytest.raises(TamperedShareError):
            open_(key, bytes(bad), aad)
    for other in (
        share_aad("run-a", 6, 1, 2),  # replayed from another round
        share_aad("run-b", 5, 1, 2),  # from another run
        share_aad("run-a", 5, 2, 1),  # misaddressed
    ):
        with pytest.raises(TamperedShareError):
            open_(key, box, other)
    with pytest.raises(TamperedShareError):
        open_(secrets.token_bytes(32), box, aad)
    with pytest.raises(TamperedShareError, match="truncated"):
        open_(key, box[:20], aad)
    assert issubclass(TamperedShareError, ValueError)


# --------------------------------------------------------------------------------------------- graph


def _is_connected(graph: dict[int, frozenset[int]]) -> bool:
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for v in graph[todo.pop()] - seen:
            seen.add(v)
            todo.append(v)
    return len(seen) == len(graph)


@pytest.mark.parametrize(("n", "k"), [(20, 6), (20, 5), (21, 5), (21, 8), (50, 12), (7, 6), (7, 10), (2, 1)])
def test_graph_symmetric_with_requested_degree(n: int, k: int) -> None:
    ids = [1000 + 3 * i for i in range(n)]
    g = neighbours(ids, k, b"public-round-seed")
    assert set(g) == set(ids)
    for u, nb in g.items():
        assert u not in nb
        for v in nb:
            assert u in g[v]
    degrees = sorted(len(nb) for nb in g.values())
    k_eff = min(k, n - 1)
    if k_eff % 2 and n % 2 and k_eff < n - 1:
        assert degrees == [k_eff] * (n - 1) + [k_eff + 1]
    else:
        assert degrees == [k_eff] * n
    assert _is_connected(g)


def test_graph_deterministic_order_independent_and_seed_dependent() -> None:
    ids = list(range(1, 41))
    g = neighbours(ids, 6, b"seed-a")
    assert g == neighbours(list(reversed(ids)), 6, b"seed-a")
    assert g != neighbours(ids, 6, b"seed-b")
    with pytest.raises(ValueError, match="distinct"):
        neighbours([1, 1, 2], 2, b"s")


def test_recommended_degree_and_threshold() -> None:
    assert recommended_threshold(10) == 6
    assert recommended_threshold(9) == 5
    assert recommended_threshold(1) == 1
    assert recommended_threshold(12, fraction=1 / 3) == 5
    assert recommended_degree(10) == 9  # small rounds: the complete graph
    ks = [recommended_degree(n) for n in (10**3, 10**4, 10**5, 10**6)]
    assert ks == sorted(ks) and ks[-1] < 300  # grows like log n
    assert ks[-1] - ks[0] < 100
    lenient = recommended_degree(1000, dropout_rate=0.1)
    assert lenient < ks[0]
    with pytest.raises(ValueError, match="threshold_fraction"):
        recommended_degree(100, dropout_rate=0.6)


# ------------------------------------------------------------------------------------- hygiene


def test_no_insecure_randomness_or_flower_in_secagg_sources() -> None:
    """Masks, keys and Shamir coefficients must come from `secrets`/os.urandom/`cryptography`:
    no `random` module and no `numpy.random` anywhere in federation/secagg (the stochastic
    rounding uses a ChaCha20 CSPRNG too, so there is no exception). Checked on the AST, so
    docstrings that mention these names do not count."""
    files = sorted(SECAGG_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"shamir.py", "quantize.py", "masking.py", "graph.py", "envelope.py"}
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = []
            for name in names:
                assert name.split(".")[0] not in {"random", "flwr"}, f"{f.name}: imports {name}"
                assert not name.startswith("numpy.random"), f"{f.name}: imports {name}"
            if isinstance(node, ast.Attribute) and node.attr == "random":
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id in {"np", "numpy"}), f"{f.name}: np.random"


# ------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("m", [1, 7, 8, 13, 38, 40, 63, 64])
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 1000, 8 * (1 << 13) + 3])  # last: across a chunk
def test_pack_unpack_round_trip_at_exactly_m_bits(m: int, length: int) -> None:
    from federation.secagg import pack_residues, packed_size, unpack_residues

    v = np.frombuffer(secrets.token_bytes(8 * length), dtype=np.uint64).copy()
    if m < 64:
        v &= np.uint64((1 << m) - 1)
    packed = pack_residues(v, m)
    assert packed.dtype == np.uint8 and packed.size == packed_size(length, m) == -(-length * m // 8)
    np.testing.assert_array_equal(unpack_residues(packed, m, length), v)
    np.testing.assert_array_equal(unpack_residues(packed.tobytes(), m, length), v)


def test_packing_layout_is_the_little_endian_bit_stream() -> None:
    from federation.secagg import pack_residues

    # 3-bit residues 1, 2, 7 -> bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b00000001
    assert pack_residues(np.array([1, 2, 7], dtype=np.uint64), 3).tolist() == [0b11010001, 0b1]


def test_unpack_refuses_wrong_sizes_and_padding() -> None:
    from federation.secagg import MaskedVectorError, PackedVectorError, pack_residues, unpack_residues

    v = np.arange(5, dtype=np.uint64)
    packed = pack_residues(v, 5)  # 25 bits -> 4 bytes, 7 padding bits
    with pytest.raises(PackedVectorError, match="bytes, expected"):
        unpack_residues(packed[:-1], 5, 5)
    with pytest.raises(PackedVectorError, match="bytes, expected"):
        unpack_residues(np.concatenate([packed, packed[:1]]), 5, 5)
    bad = packed.copy()
    bad[-1] |= 0x80
    with pytest.raises(PackedVectorError, match="padding"):
        unpack_residues(bad, 5, 5)
    with pytest.raises(PackedVectorError, match="uint8"):
        unpack_residues(packed.astype(np.uint16), 5, 5)
    with pytest.raises(ValueError, match="outside"):
        pack_residues(np.array([32], dtype=np.uint64), 5)
    assert issubclass(PackedVectorError, MaskedVectorError)


# ----------------------------------------------------------------------------------------------- PKI


def test_certificates_and_statements_verify_only_as_issued(tmp_path: Path) -> None:
    from federation.secagg import pki

    root = pki.create_fleet_pki(tmp_path, ["partition-0", "partition-1"])
    ca = pki.load_ca_public(root)
    cred = pki.load_credential(root, "partition-0")
    assert pki.verify_certificate(ca, cred.certificate) == ("partition-0", cred.public())
    other_ca = pki.create_fleet_pki(tmp_path / "other", ["partition-0"])
    with pytest.raises(pki.CertificateError, match="not signed"):
        pki.verify_certificate(pki.load_ca_public(other_ca), cred.certificate)
    forged = bytearray(cred.certificate)
    forged[3] ^= 1  # rename the device
    with pytest.raises(pki.CertificateError):
        pki.verify_certificate(ca, bytes(forged))
    statement = pki.survivors_statement(b"digest", 3, [1, 3, 4])
    sig = pki.sign(cred.private, statement)
    assert pki.verify(cred.public(), statement, sig)
    assert pki.verify(cred.public(), pki.survivors_statement(b"digest", 3, [4, 3, 1]), sig)  # a set
    for other in (
        pki.survivors_statement(b"digest", 3, [1, 3]),
        pki.survivors_statement(b"digest", 4, [1, 3, 4]),
        pki.survivors_statement(b"other", 3, [1, 3, 4]),
        pki.round_keys_statement(b"digest", 3, bytes(32), bytes(32)),
    ):
        assert not pki.verify(cred.public(), other, sig)
    assert not pki.verify(pki.load_credential(root, "partition-1").public(), statement, sig)
    with pytest.raises(pki.CertificateError, match="no secure-aggregation credential"):
        pki.load_credential(root, "partition-9")
