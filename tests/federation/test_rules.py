"""The aggregation-rule interface (`federation.rules`): the registry, the run setting
`aggregation`, the refusal of a rule that is not a sum under secure aggregation, the secure
vector built from what a rule declares it uploads, and the `median` rule's math, checked by hand.
(The default rule's exactness goes through the same interface in test_aggregation.py and
test_mixed_rank.py.)
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import numpy as np
import pytest

import federation.rules as rules
from federation.config import RunConfig
from federation.errors import FedgeError
from federation.rules import Rule, Slot, add_mean_delta, get_rule, known_rules
from federation.rules.exact_mixed_rank import WEIGHT
from federation.secagg.protocol import plan
from federation.secagg.quantize import quantization_error_bound
from federation.secagg.vector import check_plausible_sum, decode_total, encode_update, vector_length

MEDIAN = get_rule("median")
B = "lora.q.lora_B.weight"  # a LoRA B [out=2, r_max=3]
HEAD = "head.bias"  # a head [2]


# ---------------------------------------------------------------------------------- registry


def test_registry_knows_the_built_in_rules_and_refuses_an_unknown_name() -> None:
    assert known_rules()[:2] == ["exact-mixed-rank", "median"]
    assert get_rule("exact-mixed-rank").is_sum and not MEDIAN.is_sum
    with pytest.raises(
        FedgeError, match=r"unknown aggregation rule 'fedavgg'; known rules: exact-mixed-rank, median"
    ):
        get_rule("fedavgg")


def test_unknown_rule_is_refused_at_config_parse_naming_the_known_ones() -> None:
    with pytest.raises(FedgeError, match=r"aggregation.*'nosuch'.*known rules: exact-mixed-rank, median"):
        RunConfig.parse({"scenario": "smoke", "aggregation": "nosuch"})
    assert RunConfig.parse({"scenario": "smoke"}).rule is get_rule("exact-mixed-rank")  # the default


def test_a_rule_that_is_not_a_sum_is_refused_with_secure_aggregation_naming_why() -> None:
    for extra in ({}, {"secure-aggregation": True}, {"secure-aggregation": False, "bench-alternate": True}):
        with pytest.raises(
            FedgeError,
            match=r"aggregation='median' cannot run with secure aggregation: "
            r"it is not a sum of device uploads \(a coordinate-wise median needs",
        ):
            RunConfig.parse({"scenario": "smoke", "aggregation": "median", **extra})
    run = RunConfig.parse({"scenario": "smoke", "aggregation": "median", "secure-aggregation": False})
    assert run.rule is MEDIAN
    with pytest.raises(ValueError, match="not a sum"):  # and the secure vector will not lay it out
        vector_length(MEDIAN, {B: (2, 3)})


def test_a_rule_from_an_installed_package_resolves_through_the_entry_point_group(monkeypatch) -> None:
    point = EntryPoint("outside-mean", "federation.rules.exact_mixed_rank:RULE", rules.ENTRY_POINT_GROUP)
    monkeypatch.setattr(rules, "_entry_points", lambda: {"outside-mean": point})
    assert "outside-mean" in known_rules()
    with pytest.raises(FedgeError, match="registered as 'outside-mean' calls itself 'exact-mixed-rank'"):
        get_rule("outside-mean")
    bad = EntryPoint("broken", "federation.rules.exact_mixed_rank:NAME", rules.ENTRY_POINT_GROUP)
    monkeypatch.setattr(rules, "_entry_points", lambda: {"broken": bad})
    with pytest.raises(FedgeError, match=r"'broken' is a str, not a federation\.rules\.Rule"):
        get_rule("broken")


def test_a_rule_that_is_not_a_sum_must_say_why() -> None:
    with pytest.raises(ValueError, match="must say why"):
        Rule("x", "", False, "", MEDIAN.layout, MEDIAN.upload, MEDIAN.check, MEDIAN.init, MEDIAN.add,
             MEDIAN.finalize, MEDIAN.update)  # fmt: skip


# ------------------------------------------------------- secure layout from the rule's declaration

# A sum rule with none of the default rule's key names: plain FedAvg where the weight travels in
# one slot `examples` behind every value.
EXAMPLES = "examples"


def _fedavg_layout(shapes):
    return {
        **{k: Slot(tuple(s), weighted_by=EXAMPLES) for k, s in shapes.items()},
        EXAMPLES: Slot((1,), weights=True),
    }


def _fedavg_upload(delta, weight, rank=None):
    return {**{k: np.asarray(v) * weight for k, v in delta.items()}, EXAMPLES: np.array([weight])}


def _fedavg_finalize(state):
    return {k: v / state[EXAMPLES][0] for k, v in state.items() if k != EXAMPLES}


def _fedavg_add(state, upload):
    for k, v in upload.items():
        state[k] = state.get(k, 0) + np.asarray(v, dtype=np.float64)
    return state


FEDAVG = Rule("plain-fedavg", "McMahan et al. 2017", True, "", _fedavg_layout, _fedavg_upload,
              lambda u, s, w: None, dict, _fedavg_add, _fedavg_finalize, add_mean_delta)  # fmt: skip


def test_the_secure_vector_is_laid_out_from_what_the_rule_declares() -> None:
    shapes = {"w": (2, 3), "b": (4,)}  # no `#weight`, no `.lora_B.`: the layout alone drives it
    assert vector_length(FEDAVG, shapes) == 6 + 4 + 1
    params = plan(1, 1, "t", 3, vector_length(FEDAVG, shapes), clip=1.0, value_bits=24, max_weight=50)
    rng = np.random.default_rng(0)
    deltas = [{k: rng.uniform(-0.5, 0.5, size=s) for k, s in shapes.items()} for _ in range(3)]
    weights = [5, 20, 50]
    total = sum(encode_update(FEDAVG, d, w, shapes, params) for d, w in zip(deltas, weights, strict=True))
    decoded = decode_total(FEDAVG, np.asarray(total) % (1 << params.modulus_bits), shapes, params)
    assert decoded[EXAMPLES][0] == 75  # weights are exact integers
    quantum = quantization_error_bound(1.0, 24, 1)
    for k in shapes:
        exact = sum(w * d[k] for d, w in zip(deltas, weights, strict=True))
        np.testing.assert_allclose(decoded[k], exact, atol=75 * quantum)
    assert check_plausible_sum(FEDAVG, decoded, shapes, params, 3) == 75
    mean = FEDAVG.finalize(FEDAVG.add(FEDAVG.init(), decoded))
    np.testing.assert_allclose(mean["w"], sum(w * d["w"] for d, w in zip(deltas, weights, strict=True)) / 75,
                               atol=quantum)  # fmt: skip


# ------------------------------------------------------------------------------ median, by hand


def _median_round(uploads: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    state = MEDIAN.init()
    for delta, rank in uploads:
        MEDIAN.add(state, MEDIAN.upload(delta, 123.0, rank))
    return MEDIAN.finalize(state)


def test_median_is_per_coordinate_over_the_devices_that_trained_it() -> None:
    # Four devices: ranks 3, 3, 2, 1 (B columns trained: all, all, first 2, first 1).
    b = [
        np.array([[1.0, 10.0, -4.0], [0.0, 2.0, 8.0]]),
        np.array([[3.0, -2.0, 6.0], [5.0, 4.0, 1.0]]),
        np.array([[2.0, 7.0, 0.0], [-1.0, 3.0, 0.0]]),
        np.array([[100.0, 0.0, 0.0], [9.0, 0.0, 0.0]]),
    ]
    heads = [np.array([1.0, -1.0]), np.array([2.0, 5.0]), np.array([40.0, 0.0]), np.array([3.0, 2.0])]
    mean = _median_round([({B: bb, HEAD: h}, r) for bb, h, r in zip(b, heads, (3, 3, 2, 1), strict=True)])
    # column 0: all four -> median of {1,3,2,100} = 2.5 and of {0,5,-1,9} = 2.5
    # column 1: devices 1-3 -> median {10,-2,7} = 7 and {2,4,3} = 3
    # column 2: devices 1-2 -> median {-4,6} = 1 and {8,1} = 4.5
    np.testing.assert_array_equal(mean[B], [[2.5, 7.0, 1.0], [2.5, 3.0, 4.5]])
    # heads: every device -> median {1,2,40,3} = 2.5, {-1,5,0,2} = 1
    np.testing.assert_array_equal(mean[HEAD], [2.5, 1.0])
    # the weight (123 examples) is not uploaded and not used: the median is unweighted
    assert set(np.unique(MEDIAN.upload({B: b[0], HEAD: heads[0]}, 123.0, 3)[B + WEIGHT])) == {1.0}


def test_median_resists_one_outlier_where_the_mean_does_not_and_untrained_columns_stay() -> None:
    honest = [np.array([[0.1, 0.0]]), np.array([[0.2, 0.0]]), np.array([[0.3, 0.0]])]
    hostile = np.array([[1e6, 0.0]])
    mean = _median_round([({B: d}, 1) for d in [*honest, hostile]])
    np.testing.assert_allclose(mean[B], [[0.25, 0.0]])  # column 1: nobody trained it -> 0 delta
    g = {B: np.array([[1.0, 7.0]], dtype=np.float32), "other": np.ones(2, dtype=np.float32)}
    new = MEDIAN.update(g, mean, 1.0)
    np.testing.assert_allclose(new[B], [[1.25, 7.0]])
    assert new[B].dtype == np.float32 and np.array_equal(new["other"], g["other"])


def test_median_refuses_uploads_that_are_not_marks_of_trained_entries() -> None:
    shapes = {B: (2, 3), HEAD: (2,)}
    good = MEDIAN.upload({B: np.ones((2, 3)), HEAD: np.ones(2)}, 40.0, 3)
    assert MEDIAN.check(good, shapes, 100_000) is None
    weighted = get_rule("exact-mixed-rank").upload({B: np.ones((2, 3)), HEAD: np.ones(2)}, 40.0, 3)
    assert "mark trained entries with 1" in MEDIAN.check(weighted, shapes, 100_000)
    nan = {**good, HEAD: np.array([np.nan, 0.0], dtype=np.float32)}
    assert "NaN" in MEDIAN.check(nan, shapes, 100_000)
