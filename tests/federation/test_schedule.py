"""The simulated round: eligibility, over-selection, deadline and dropout accounting."""

from __future__ import annotations

import dataclasses

from federation.devices import ELIGIBILITY_STREAM, builtin_catalogue, device_rng, is_eligible
from federation.schedule import Candidate, device_index, hour_of, plan_round
from federation.tasks import get_task


def _fleet(n_per_tier: int = 20) -> list[Candidate]:
    catalogue = builtin_catalogue()
    out = []
    node = 0
    for (device_class, tier), profile in catalogue.items():
        for k in range(n_per_tier):
            out.append(
                Candidate(
                    node,
                    device_class,
                    profile,
                    device_index(device_class, f"{tier}-{k}"),
                    900_000,
                    1_800_000,
                    10,
                    get_task(profile.task).info.flops_per_example,
                )
            )
            node += 1
    return out


def test_only_eligible_devices_are_sampled_and_outcomes_add_up() -> None:
    fleet = _fleet()
    targets = {"phone": 8, "tv": 6, "sensor": 4}
    for server_round, start in ((1, 2 * 3600.0), (2, 13 * 3600.0), (3, 21.5 * 3600.0)):
        plan = plan_round(fleet, targets, start, seed=7, server_round=server_round, deadline_s=30.0)
        hour = hour_of(start)
        eligible = {
            c.node
            for c in fleet
            if is_eligible(c.profile, hour, device_rng(7, c.index, server_round, ELIGIBILITY_STREAM))
        }
        assert set(plan.kept) <= eligible  # no ineligible device is ever kept (or sampled)
        account = plan.account
        assert account.eligible == len(eligible)
        assert account.finished + account.dropped + account.stragglers == account.sampled
        assert account.finished == len(plan.kept)
        for device_class, counts in account.per_class.items():
            assert counts.finished <= targets[device_class]
            assert counts.sampled <= max(counts.eligible, 0)
            assert counts.finished + counts.dropped + counts.stragglers == counts.sampled
        assert 0 < plan.duration_s <= 30.0
        assert account.energy_j > 0


def test_over_selection_samples_130_percent_and_keeps_the_target() -> None:
    fleet = _fleet(60)
    plan = plan_round(fleet, {"tv": 10}, 2 * 3600.0, seed=1, server_round=1, deadline_s=600.0)
    tv = plan.account.per_class["tv"]
    assert tv.sampled == 13  # ceil(1.3 x 10) of the many eligible TVs
    assert (
        tv.finished == 10 - 0 or tv.finished + tv.dropped >= 10
    )  # a long deadline: only dropouts cost reports
    assert tv.finished <= 10


def test_a_tight_deadline_makes_stragglers_and_the_same_seed_the_same_round() -> None:
    fleet = _fleet()
    # 5 s: a high-tier phone finishes (~3.4 s: 10 steps of batch 16 at 80 GFLOP/s + transfers),
    # low and mid tiers (~15 s, ~6 s) are stragglers
    tight = plan_round(fleet, {"phone": 8}, 2 * 3600.0, seed=3, server_round=1, deadline_s=5.0)
    assert tight.account.stragglers > 0 and tight.kept
    assert all(c.profile.tier == "high" for c in fleet if c.node in tight.kept)
    assert tight.duration_s == 5.0  # short of its target, the round waits out the deadline
    again = plan_round(fleet, {"phone": 8}, 2 * 3600.0, seed=3, server_round=1, deadline_s=5.0)
    assert again.kept == tight.kept and dataclasses.asdict(again.account) == dataclasses.asdict(tight.account)
    other = plan_round(fleet, {"phone": 8}, 2 * 3600.0, seed=4, server_round=1, deadline_s=5.0)
    assert other.kept != tight.kept


def test_dropouts_are_counted_and_never_kept() -> None:
    catalogue = builtin_catalogue()
    flaky = dataclasses.replace(catalogue[("tv", "high")], dropout_prob=1.0)
    fleet = [Candidate(i, "tv", flaky, i, 1000, 1000, 1, 1.0e9) for i in range(20)]
    plan = plan_round(fleet, {"tv": 5}, 2 * 3600.0, seed=0, server_round=1, deadline_s=60.0)
    assert plan.kept == []
    assert plan.account.dropped == plan.account.sampled > 0
    assert plan.duration_s == 60.0
