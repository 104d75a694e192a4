"""Distributed DP's math (`federation/privacy`) and its place in the secure vector
(`federation.secagg.vector`): the rotation is inverted exactly, clipping happens on the device,
the decoded sum carries the promised noise variance, a wrapped modulus is detected, the
accountant reproduces published values and grows with the rounds, and a device refuses a round
whose DP parameters are not its own.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
from scipy.stats import norm

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.privacy.accountant import ORDERS, PrivacyAccountant, Release, epsilon_of, release_rdp
from federation.privacy.encoding import WRAP_TARGET, plan_dp
from federation.privacy.noise import discrete_gaussian, skellam
from federation.privacy.rotation import padded_length, rotate, signs, unrotate
from federation.privacy.rounding import conditional_round, rounded_l2_bound
from federation.rules import get_rule
from federation.secagg.protocol import Expected, ParameterError, check_params, plan
from federation.secagg.vector import (
    ImplausibleSumError,
    check_plausible_sum,
    decode_total,
    dp_value_length,
    encode_update,
    vector_length,
)

DDG, SKELLAM = "distributed-discrete-gaussian", "skellam"
RULE = get_rule("exact-mixed-rank")
B, HEAD = "lora.q.lora_B.weight", "head.weight"
SHAPES = {B: (16, 4), HEAD: (3, 20)}  # 124 values -> rotated in 128 coordinates


def _params(n: int, mechanism: str = DDG, z: float = 1.0, clip: float = 0.5):
    return plan(7, 3, "phone", n, vector_length(RULE, SHAPES, dp=True), clip=1.0, value_bits=24, max_weight=1,
                dp_mechanism=mechanism, dp_noise_multiplier=z, dp_clip=clip,
                dp_length=dp_value_length(RULE, SHAPES))  # fmt: skip


def _delta(rng: np.random.Generator, scale: float = 0.01, rank: int = 4) -> dict[str, np.ndarray]:
    b = rng.normal(0, scale, SHAPES[B])
    b[:, rank:] = 0
    return {B: b, HEAD: rng.normal(0, scale, SHAPES[HEAD])}


def _secure_sum(vectors: list[np.ndarray], m: int) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total = total + v  # uint64 wraps mod 2^64, a multiple of 2^m
    return total & np.uint64((1 << m) - 1)


# ---------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("length", [1, 5, 124, 1024, 3000])
def test_the_rotation_keeps_norms_and_is_inverted_exactly(length: int) -> None:
    rng = np.random.default_rng(length)
    x, seed = rng.normal(size=length), os.urandom(32)
    y = rotate(x, seed)
    assert y.size == padded_length(length) >= length
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(unrotate(y, seed, length), x, rtol=0, atol=1e-12)
    # linear with a shared seed: the server undoes the rotation of a sum
    xs = [rng.normal(size=length) for _ in range(3)]
    np.testing.assert_allclose(unrotate(sum(rotate(v, seed) for v in xs), seed, length), sum(xs), atol=1e-12)
    if length > 1:  # another round's signs do not invert it
        # a fixed other seed whose signs differ on the data's coordinates: a random one agrees
        # on all 5 of length 5's with probability 1/32, which made this check flaky
        other = next(
            s for s in (bytes([i]) * 32 for i in range(256))
            if not np.array_equal(signs(s, length), signs(seed, length))
        )
        assert not np.allclose(unrotate(y, other, length), x, atol=1e-6)


def test_the_rotation_flattens_a_spike() -> None:
    x = np.zeros(4096)
    x[17] = 1.0  # all the energy in one coordinate
    y = rotate(x, os.urandom(32))
    assert np.max(np.abs(y)) == pytest.approx(1 / 64)  # spread evenly over the 4096 coordinates


# ---------------------------------------------------------------------- clipping and rounding


def test_conditional_rounding_is_unbiased_and_never_exceeds_the_bound() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(0, 3.0, 256)
    y *= 40 / np.linalg.norm(y)
    bound = rounded_l2_bound(40.0, 256)
    draws = np.stack([conditional_round(y, bound) for _ in range(400)])
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert np.all(np.abs(draws - y) < 1)  # a neighbouring integer
    # unbiased: the std of a mean of 400 draws is <= 0.025, so 0.125 is 5 sigma
    np.testing.assert_allclose(draws.mean(axis=0), y, atol=0.125)
    with pytest.raises(ValueError, match="conditional rounding failed"):
        conditional_round(y * 10, bound)  # an unclipped input cannot pass


def test_the_device_clips_its_update_to_dp_clip() -> None:
    """With no noise, one device's decoded contribution is its update scaled to L2 norm dp-clip
    (up to the rounding quantum), however long the update it trained."""
    params = _params(3, z=0.0, clip=0.5)
    rng = np.random.default_rng(2)
    for size in (0.001, 10.0):  # short: unchanged; long: clipped
        delta = _delta(rng, size)
        vector = encode_update(RULE, delta, 32, SHAPES, params, rank=4)
        decoded = decode_total(RULE, vector, SHAPES, params, survivors=1)
        flat = np.concatenate([delta[B].ravel(), delta[HEAD].ravel()])
        got = np.concatenate([decoded[B].ravel(), decoded[HEAD].ravel()])
        expected = flat * min(1.0, 0.5 / np.linalg.norm(flat))
        assert np.linalg.norm(got) <= 0.5 * (1 + 1e-6)
        np.testing.assert_allclose(got, expected, atol=2 / params.dp_plan().scale)
        assert decoded[HEAD + "#weight"].tolist() == [1.0]  # weight 1, not its 32 examples


# ---------------------------------------------------------------------------------- the noise


@pytest.mark.parametrize("mechanism", [DDG, SKELLAM])
def test_the_decoded_sum_carries_the_promised_noise_variance(mechanism: str) -> None:
    """n = 4 devices with zero updates, 40 rounds: the decoded sum is the noise alone. Over
    40 x 124 coordinates its variance must be (z x Delta_2 / s)^2 = (z x dp-clip)^2 to within 8%
    (the sample variance of N = 4960 values has a relative standard error sqrt(2/N) = 2%:
    a 4-sigma tolerance, since the noise comes from unseedable cryptographic randomness and a
    3-sigma one fails one run in 370), and its mean 0."""
    z, clip, n = 1.5, 0.5, 4
    zero = {B: np.zeros(SHAPES[B]), HEAD: np.zeros(SHAPES[HEAD])}
    samples = []
    for _ in range(40):
        params = _params(n, mechanism, z, clip)
        vectors = [encode_update(RULE, zero, 1, SHAPES, params, rank=4) for _ in range(n)]
        decoded = decode_total(RULE, _secure_sum(vectors, params.modulus_bits), SHAPES, params, n)
        samples.append(np.concatenate([decoded[B].ravel(), decoded[HEAD].ravel()]))
    noise = np.concatenate(samples)
    plan_ = params.dp_plan()
    promised = plan_.variance / plan_.scale**2
    assert promised == pytest.approx((z * clip) ** 2, rel=1e-4)  # Delta_2 / s is dp-clip (+ rounding)
    assert noise.var() == pytest.approx(promised, rel=0.08)
    assert abs(noise.mean()) < 4 * math.sqrt(promised / noise.size)


def test_noise_shares_have_their_variance_and_come_from_fresh_randomness() -> None:
    for sigma in (0.8, 30.0, 3e6):
        x = discrete_gaussian(50_000, sigma)
        assert x.var() == pytest.approx(sigma**2, rel=0.04)
    for variance in (3.0, 500.0, 2e13):
        x = skellam(50_000, variance)
        assert x.var() == pytest.approx(variance, rel=0.04) and abs(x.mean()) < 5 * math.sqrt(variance / 5e4)
    assert not np.array_equal(discrete_gaussian(64, 100.0), discrete_gaussian(64, 100.0))
    # discrete Gaussian: the shape, not only the variance (P(|X| > 2 sigma) of a Gaussian)
    x = discrete_gaussian(200_000, 50.0)
    assert np.mean(np.abs(x) > 100) == pytest.approx(2 * norm.sf(2.0), rel=0.05)


# ------------------------------------------------------------------- the modulus and its wrap


def test_the_modulus_leaves_room_and_states_the_wrap_probability() -> None:
    for mechanism in (DDG, SKELLAM):
        for z in (0.5, 1.0, 4.0):
            p = plan_dp(mechanism, z, 0.1, 24, 4, 220_000)
            assert p.wrap_probability <= WRAP_TARGET
            assert 2 ** (p.modulus_bits - 1) > p.n * p.l2_bound  # the signal alone never wraps
            assert p.modulus_bits <= 40
    assert plan_dp(DDG, 0.0, 0.1, 24, 4, 1000).wrap_probability == 0.0


def test_a_wrapped_coordinate_is_detected_and_the_sum_refused() -> None:
    n = 4
    params = _params(n)
    rng = np.random.default_rng(3)
    vectors = [encode_update(RULE, _delta(rng), 1, SHAPES, params, rank=4) for _ in range(n)]
    m = params.modulus_bits
    total = _secure_sum(vectors, m)
    decode_total(RULE, total, SHAPES, params, n)  # the honest sum passes
    wrapped = total.copy()
    wrapped[5] = np.uint64((1 << (m - 1)) + 12)  # what a coordinate just past +2^(m-1) decodes from
    with pytest.raises(ImplausibleSumError, match="wrapped the modulus"):
        decode_total(RULE, wrapped, SHAPES, params, n)


def test_a_device_that_skips_its_clipping_is_caught_by_the_norm_check() -> None:
    """A hostile device boosts its update 50x past dp-clip (skipping its own clip): the sum's L2
    norm gives it away and the group's update is refused; within the bound it passes, and its
    effect on the sum is then at most n x dp-clip + the noise's norm bound (docs/privacy.md)."""
    n, clip = 4, 0.5
    params = _params(n, z=1.0, clip=clip)
    rng = np.random.default_rng(4)
    honest = [encode_update(RULE, _delta(rng), 1, SHAPES, params, rank=4) for _ in range(n - 1)]
    plan_ = params.dp_plan()

    def hostile(boost: float) -> np.ndarray:
        """Its update: one coordinate of length boost x dp-clip, rotated and scaled as the round
        says, but never clipped (and without noise: the hostile device keeps it out)."""
        spike = np.zeros(params.dp_length)
        spike[0] = boost * clip
        q = np.rint(rotate(spike, params.dp_rotation_seed) * plan_.scale).astype(np.int64)
        weights = np.ones(5, dtype=np.int64)  # B#weight (4 columns), head.weight#weight
        full = np.concatenate([q, weights]).view(np.uint64)
        return full & np.uint64((1 << params.modulus_bits) - 1)

    with pytest.raises(ImplausibleSumError, match="dp-norm-bound"):
        decode_total(RULE, _secure_sum([*honest, hostile(50.0)], params.modulus_bits), SHAPES, params, n)
    # one that stays just within what the check lets through moves the sum by a bounded amount
    u = math.log(1 / WRAP_TARGET)
    noise_bound = math.sqrt(plan_.variance * (plan_.dim + 2 * math.sqrt(plan_.dim * u) + 2 * u)) / plan_.scale
    honest_sum = decode_total(RULE, _secure_sum(honest, params.modulus_bits), SHAPES, params, n - 1)
    with_it = decode_total(RULE, _secure_sum([*honest, hostile(2.0)], params.modulus_bits), SHAPES, params, n)
    moved = np.sqrt(sum(np.sum((with_it[k] - honest_sum[k]) ** 2) for k in (B, HEAD)))
    assert moved <= n * clip + 2 * noise_bound  # the hostile part, plus the two sums' noise


# ---------------------------------------------------------------------------- the accountant


def _gaussian_release(sigma_over_sensitivity: float, survivors: int = 4) -> Release:
    """A release whose noise std is sigma x Delta_2 (all `survivors` of 4 planned devices)."""
    plan_ = plan_dp(DDG, sigma_over_sensitivity, 1.0, 24, 4, 4096)
    return Release("phone", plan_, survivors)


def test_the_accountant_reproduces_the_gaussian_mechanism() -> None:
    """sigma = Delta (noise multiplier 1), delta = 1e-5, one release. Published references:
    - the RDP bound of the Gaussian mechanism (Mironov 2017) as dp-accounting computes it for a
      `GaussianDpEvent(1.0)` at the same integer orders: epsilon = 4.7527 (the same RDP curve,
      alpha / 2; with dp-accounting's default orders, fractional ones included, 4.7285);
    - the exact (epsilon, delta) curve of the Gaussian mechanism (Balle and Wang, ICML 2018,
      Theorem 8: delta(eps) = Phi(1/2s - eps s) - e^eps Phi(-1/2s - eps s)): our epsilon must be
      sound (the exact delta at it is <= 1e-5) and within 10% of the exact epsilon, 4.38;
    - Bun and Steinke's conversion rho + 2 sqrt(rho ln(1/delta)) = 5.30 is an upper bound."""
    import dp_accounting

    rho, xi = release_rdp(_gaussian_release(1.0))
    assert rho == pytest.approx(0.5, rel=1e-9) and xi == 0.0  # tau underflows at sigma ~ 8e6
    eps = epsilon_of(rho, xi, 1e-5)
    gaussian = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    gaussian.compose(dp_accounting.GaussianDpEvent(1.0))
    assert eps == pytest.approx(gaussian.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(4.7527, abs=1e-3)
    default_orders = dp_accounting.rdp.RdpAccountant()
    default_orders.compose(dp_accounting.GaussianDpEvent(1.0))
    assert default_orders.get_epsilon(1e-5) == pytest.approx(4.7285, abs=1e-3)
    assert default_orders.get_epsilon(1e-5) <= eps

    def exact_delta(e: float, s: float = 1.0) -> float:
        return float(norm.cdf(1 / (2 * s) - e * s) - math.exp(e) * norm.cdf(-1 / (2 * s) - e * s))

    assert exact_delta(eps) <= 1e-5 < exact_delta(0.9 * eps)
    assert eps <= 0.5 + 2 * math.sqrt(0.5 * math.log(1e5))


def test_the_accountant_grows_with_rounds_and_with_dropouts() -> None:
    accountant = PrivacyAccountant(1e-5, 2.0, DDG)
    release = _gaussian_release(2.0)
    entries = [accountant.record_round([release]) for _ in range(12)]
    epsilons = [e["epsilon"] for e in entries]
    assert all(b > a for a, b in itertools.pairwise(epsilons))  # strictly monotone
    assert len({round(e["round_epsilon"], 9) for e in entries}) == 1  # each round costs the same
    # 12 rounds of rho = 1/8 compose to rho = 1.5: dp-accounting's Gaussian with sigma = sqrt(1/3)
    assert epsilons[-1] == pytest.approx(epsilon_of(12 / 8, 0.0, 1e-5), rel=1e-9)
    assert entries[-1]["noise_multiplier"] == 2.0 and entries[-1]["wrap_probability"] <= WRAP_TARGET
    # fewer survivors added less noise: the round costs more
    assert release_rdp(_gaussian_release(2.0, survivors=2))[0] == pytest.approx(2 * release_rdp(release)[0])
    # no release (a task sat out or aborted) costs nothing; a resumed ledger continues
    same = PrivacyAccountant(1e-5, 2.0, DDG)
    same.restore(entries[5])
    assert same.record_round([])["epsilon"] == pytest.approx(epsilons[5])
    assert same.record_round([release])["epsilon"] == pytest.approx(epsilons[6])


def test_skellam_accounting_matches_the_gaussian_for_large_variance() -> None:
    plan_ = plan_dp(SKELLAM, 1.0, 1.0, 24, 4, 4096)
    rho, xi = release_rdp(Release("tv", plan_, 4))
    assert rho == pytest.approx(0.5, rel=1e-6) and xi < 1e-6
    assert epsilon_of(rho, xi, 1e-5) == pytest.approx(4.7527, abs=2e-3)


def test_no_noise_means_no_guarantee() -> None:
    release = Release("tv", plan_dp(DDG, 0.0, 1.0, 24, 4, 64), 4)
    entry = PrivacyAccountant(1e-5, 0.0, DDG).record_round([release])
    assert entry["epsilon"] is None and entry["round_epsilon"] is None  # JSON null: epsilon infinite


# --------------------------------------------------------------------- parameters and config


def test_a_device_refuses_a_round_with_less_noise_another_clip_or_modulus() -> None:
    params = _params(4, z=1.0, clip=0.5)
    mine = Expected(7, "phone", 1.0, 24, 1, 3, dp_mechanism=DDG, dp_noise_multiplier=1.0, dp_clip=0.5)
    check_params(params, mine)
    import dataclasses

    for change in ({"dp_noise_multiplier": 0.5}, {"dp_clip": 5.0}, {"dp_mechanism": "none"},
                   {"modulus_bits": params.modulus_bits - 2}, {"dp_rotation_seed": b"short"},
                   {"max_weight": 100}):  # fmt: skip
        with pytest.raises(ParameterError, match="refusing secure-aggregation parameters"):
            check_params(dataclasses.replace(params, **change), mine)


def test_dp_settings_are_validated_at_config_parse() -> None:
    base = {"scenario": "smoke", "dp-mechanism": DDG}
    assert RunConfig.parse(base).dp and not RunConfig.parse({"scenario": "smoke"}).dp
    with pytest.raises(FedgeError, match="needs secure-aggregation = true"):
        RunConfig.parse({**base, "secure-aggregation": False})
    with pytest.raises(FedgeError, match="needs secure-aggregation = true"):
        RunConfig.parse({**base, "bench-alternate": True})
    with pytest.raises(FedgeError, match="dp-mechanism='laplace' must be one of"):
        RunConfig.parse({"scenario": "smoke", "dp-mechanism": "laplace"})
    with pytest.raises(FedgeError, match=r"dp-delta=1\.5 must be in"):
        RunConfig.parse({**base, "dp-delta": 1.5})
    with pytest.raises(FedgeError, match=r"dp-clip=0\.0 must be > 0"):
        RunConfig.parse({**base, "dp-clip": 0.0})


def test_the_weights_of_a_private_sum_are_exact_counts() -> None:
    n = 4
    params = _params(n)
    rng = np.random.default_rng(5)
    ranks = [1, 2, 4, 4]
    vectors = [encode_update(RULE, _delta(rng, rank=r), 10 * r, SHAPES, params, rank=r) for r in ranks]
    decoded = decode_total(RULE, _secure_sum(vectors, params.modulus_bits), SHAPES, params, n)
    assert decoded[B + "#weight"].tolist() == [4, 3, 2, 2] and decoded[HEAD + "#weight"].tolist() == [4]
    assert check_plausible_sum(RULE, decoded, SHAPES, params, n) == 4
    with pytest.raises(ImplausibleSumError, match="weight-range"):  # a device claiming weight 2
        inflated = {
            **decoded,
            B + "#weight": decoded[B + "#weight"] + 1,
            HEAD + "#weight": decoded[HEAD + "#weight"] + 1,
        }
        check_plausible_sum(RULE, inflated, SHAPES, params, n)
