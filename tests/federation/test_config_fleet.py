"""Run-config parsing, the partition -> device mapping of a fleet, and checkpoints.

The fleet draws real data clients (Shakespeare roles, MovieLens viewers, watch subjects) from
the default fedge cache ($FEDGE_CACHE or ~/.cache/fedge), which holds the parsed client lists.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.checkpoint import load_checkpoint, save_checkpoint
from federation.config import RunConfig
from federation.errors import FedgeError
from federation.fleet import (
    Device,
    all_data_clients,
    device_for_partition,
    device_from_node_config,
    fleet_data_clients,
)
from federation.scenarios import Scenario, fleet_order, get_scenario

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------ config


def test_pyproject_run_config_parses_to_the_documented_defaults() -> None:
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run = RunConfig.parse(app_config)
    assert run == RunConfig.parse({})  # the code's defaults are the pyproject's
    assert run.scenario.name == "smart-home"
    assert run.rounds == run.scenario.rounds == 12  # 0 means: the scenario's
    assert run.local_steps == 0  # 0 means: the scenario's, per device class
    # the TV's 20: the most steps a TV takes, training 0.35 epochs of its ratings
    assert [run.train_for(c).steps for c in ("phone", "tv", "sensor")] == [10, 20, 60]
    assert run.scenario.lr_final == {"sensor": 0.2}
    assert run.scenario.local_epochs == {"tv": 0.35}
    assert RunConfig.parse({"local-steps": 3}).train_for("sensor").steps == 3
    assert (run.lora.rank, run.lora.alpha, run.lora.targets) == (8, 16, ("query", "value"))
    assert run.train.lr == pytest.approx(3e-3) and run.train.private_lr == pytest.approx(0.05)
    assert run.seed == 0 and run.seq_len == 32 and run.tv_user_dim == 16


def test_overrides_are_applied() -> None:
    run = RunConfig.parse(
        {"scenario": "smoke", "num-rounds": 5, "local-steps": 2, "lora-targets": "query, key,dense", "lr": 1}
    )
    assert run.scenario.name == "smoke" and run.rounds == 5 and run.train.steps == 2
    assert run.lora.targets == ("query", "key", "dense")
    assert run.train.lr == 1.0 and isinstance(run.train.lr, float)  # an int where a float is wanted is fine


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"scenario": "no-such-scenario"}, "scenario"),
        ({"scenario": 3}, "scenario="),
        ({"lora-rank": "8"}, "lora-rank="),
        ({"lora-rank": 0}, "lora-rank="),
        ({"lora-rank": 8.0}, "lora-rank="),
        ({"lr": -1}, "run config lr="),
        ({"lr": True}, "run config lr="),
        ({"head-lr": 0.0}, "head-lr="),
        ({"lora-targets": "foo"}, "lora-targets="),
        ({"lora-targets": "query,foo"}, "lora-targets="),
        ({"lora-targets": " , "}, "lora-targets="),
        ({"num-rounds": -1}, "num-rounds="),
        ({"batch-size": 0}, "batch-size="),
        ({"seed": "0"}, "seed="),
        ({"round-timeout": "600"}, "round-timeout="),
    ],
)
def test_bad_values_fail_with_a_one_line_message_naming_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(FedgeError) as info:
        RunConfig.parse(cfg)
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message


# ------------------------------------------------------------------------------------- fleet


def test_partitions_map_to_a_mixed_fleet_deterministically() -> None:
    scenario = get_scenario("smart-home")
    devices = [device_for_partition(scenario, p, seed=0) for p in range(scenario.size)]
    assert [d.device_class for d in devices[:3]] == ["phone", "tv", "sensor"]
    assert [d.task for d in devices[:3]] == ["phone", "tv", "sensor"]
    counts = {c: sum(d.device_class == c for d in devices) for c in scenario.fleet}
    assert counts == scenario.fleet == {"phone": 14, "tv": 10, "sensor": 16}
    assert len(set(devices)) == scenario.size  # every device holds its own data client
    # any prefix of the nodes is mixed
    assert {d.device_class for d in devices[:6]} == {"phone", "tv", "sensor"}
    assert devices == [device_for_partition(scenario, p, seed=0) for p in range(scenario.size)]
    assert fleet_order(scenario)[:4] == [("phone", 0), ("tv", 0), ("sensor", 0), ("phone", 1)]


def test_smart_home_is_a_mixed_rank_fleet() -> None:
    scenario = get_scenario("smart-home")
    assert scenario.size == 40 and sum(scenario.per_round.values()) == 16
    assert scenario.tiers == {
        "phone/low": 5,
        "phone/mid": 5,
        "phone/high": 4,
        "tv/mid": 6,
        "tv/high": 4,
        "sensor/low": 8,
        "sensor/high": 8,
    }
    devices = [device_for_partition(scenario, p, seed=0) for p in range(scenario.size)]
    assert Counter(f"{d.device_class}/{d.tier}" for d in devices) == scenario.tiers
    ranks = {c: sorted({d.rank for d in devices if d.device_class == c}) for c in scenario.fleet}
    assert ranks == {"phone": [2, 4, 8], "tv": [4, 8], "sensor": [2, 4]}
    # tiers are dealt round-robin within a class: any prefix of a class mixes its tiers
    phones = [d for d in devices if d.device_class == "phone"]
    assert [d.tier for d in phones[:4]] == ["low", "mid", "high", "low"]
    assert [d.tier for d in phones[12:]] == ["low", "mid"]
    # the smoke fleet stays small and mixed too
    smoke = get_scenario("smoke")
    smoke_devices = [device_for_partition(smoke, p, seed=0) for p in range(smoke.size)]
    assert smoke.size == 10 and {d.rank for d in smoke_devices} == {2, 4, 8}


def test_fleet_counts_by_class_and_tier() -> None:
    def scenario(fleet: dict, per_round: dict | None = None) -> Scenario:
        return Scenario("t", "", fleet, per_round or {"phone": 1}, 1, {"phone": 1})

    # a bare class means its top tier; counts per class derive from the tiers
    mixed = scenario({"phone/low": 2, "phone": 1, "tv/mid": 3})
    assert mixed.tiers == {"phone/low": 2, "phone/high": 1, "tv/mid": 3}
    assert mixed.fleet == {"phone": 3, "tv": 3} and mixed.size == 6 and mixed.tasks == ("phone", "tv")
    assert [mixed.tier_of("phone", i) for i in range(3)] == ["low", "high", "low"]
    with pytest.raises(IndexError):
        mixed.tier_of("phone", 3)
    # dataclasses.replace keeps the tiers; a new fleet replaces them
    assert dataclasses.replace(mixed, rounds=5).tiers == mixed.tiers
    assert dataclasses.replace(mixed, fleet={"phone/mid": 2}).tiers == {"phone/mid": 2}
    for fleet, per_round, words in [
        ({"phone/ultra": 1}, None, ["phone/ultra", "low, mid, high"]),
        ({"toaster/low": 1}, None, ["toaster"]),
        ({"phone": 1, "phone/high": 1}, None, ["phone/high", "twice"]),
        ({"phone/low": -1}, None, ["phone/low", "non-negative"]),
        ({"phone/low": 2}, {"phone/low": 1}, ["phone/low", "per class"]),
        ({"phone/low": 2}, {"tv": 1}, ["tv", "per_round"]),
    ]:
        with pytest.raises(FedgeError) as info:
            scenario(fleet, per_round)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(("device_class", "count"), [("phone", 14), ("tv", 10), ("sensor", 12)])
def test_fleet_data_clients_are_distinct_seeded_draws(device_class: str, count: int) -> None:
    pool = all_data_clients(device_class)
    assert len(pool) > count
    draw = fleet_data_clients(device_class, count, 0)
    assert len(draw) == len(set(draw)) == count
    assert set(draw) <= set(pool)
    # recomputed without the process cache: the same draw
    assert fleet_data_clients.__wrapped__(device_class, count, 0) == draw
    others = [fleet_data_clients(device_class, count, seed) for seed in (1, 2, 3)]
    assert all(o != draw for o in others)


def test_fleet_larger_than_the_dataset_is_refused() -> None:
    with pytest.raises(FedgeError, match="17 sensor devices"):
        fleet_data_clients("sensor", 17, 0)


@pytest.mark.parametrize("partition_id", [-1, 40, 100])
def test_partition_out_of_range_names_num_supernodes(partition_id: int) -> None:
    with pytest.raises(FedgeError, match=r"num-supernodes=40"):
        device_for_partition(get_scenario("smart-home"), partition_id, seed=0)
    with pytest.raises(FedgeError, match=r"num-supernodes=40"):
        device_from_node_config({"partition-id": partition_id}, get_scenario("smart-home"), 0)


def test_deployment_node_config_resolves() -> None:
    scenario = get_scenario("smart-home")
    assert device_from_node_config({"device-class": "tv", "data-client": "301"}, scenario, 0) == Device(
        "tv", "301"
    )
    phone = device_from_node_config({"device-class": "phone", "data-client": "hamlet/HAM"}, scenario, 0)
    assert phone == Device("phone", "hamlet/HAM") and phone.task == "phone"
    # device-class + partition-id: the index within that class's seeded draw, and its tier there
    assert device_from_node_config({"device-class": "sensor", "partition-id": 2}, scenario, 0) == Device(
        "sensor", fleet_data_clients("sensor", 8, 0)[2], "low"
    )
    # without a tier, a device outside the scenario's fleet is its class's top tier
    tv = device_from_node_config({"device-class": "tv", "data-client": "301"}, scenario, 0)
    assert (tv.tier, tv.rank) == ("high", 8)
    # a node may say its tier
    low = device_from_node_config(
        {"device-class": "phone", "data-client": "hamlet/HAM", "tier": "low"}, scenario, 0
    )
    assert (low.tier, low.rank) == ("low", 2)
    sim = device_from_node_config({"partition-id": 0, "tier": "mid"}, scenario, 0)
    assert (sim.device_class, sim.tier, sim.rank) == ("phone", "mid", 4)
    # simulation: the partition id alone
    sim = device_from_node_config({"partition-id": 1, "num-partitions": 40}, scenario, 0)
    assert sim == device_for_partition(scenario, 1, 0) and sim.device_class == "tv"


@pytest.mark.parametrize(
    ("node_config", "words"),
    [
        ({"device-class": "tv", "data-client": "301", "tier": "low"}, ["tier", "'low'", "mid, high"]),
        ({"partition-id": 0, "tier": "ultra"}, ["tier", "ultra", "low, mid, high"]),
        ({"device-class": "tv", "data-client": "no-such-viewer"}, ["data-client", "no-such-viewer"]),
        ({"device-class": "sensor", "data-client": "s1a"}, ["data-client", "s1a"]),  # vendor lab
        ({"device-class": "toaster"}, ["device-class", "toaster"]),
        ({}, ["device-class", "partition-id"]),
    ],
)
def test_bad_node_config_fails_naming_the_key(node_config: dict, words: list[str]) -> None:
    with pytest.raises(FedgeError) as info:
        device_from_node_config(node_config, get_scenario("smart-home"), 0)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------- checkpoint


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "phone/lora.encoder.layer.0.attention.self.query.lora_B.weight": rng.normal(size=(384, 8)).astype(
            np.float32
        ),
        "sensor/head.bias": rng.normal(size=(7,)).astype(np.float32),
        "tv/head.global_bias": np.array([0.25], dtype=np.float32),
        "x/float64": rng.normal(size=(2, 3)),
    }


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    state, info = _state(), {"round": 7, "scenario": "smoke", "tasks": ["phone", "tv"], "seed": 3}
    path = save_checkpoint(tmp_path / "run", state, info)
    assert path == tmp_path / "run" / "checkpoint.safetensors"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # atomic: no temp files left
    for source in (path, path.parent):  # the file or its folder
        loaded, loaded_info = load_checkpoint(source)
        assert loaded_info == info
        assert set(loaded) == set(state)
        for key, value in state.items():
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
            assert loaded[key].tobytes() == value.tobytes()


def _one_line_error(path: Path) -> str:
    with pytest.raises(FedgeError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_checkpoint(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_error(tmp_path / "nope" / "checkpoint.safetensors")


@pytest.mark.parametrize("damage", ["truncate-tail", "truncate-header", "garbage", "empty"])
def test_corrupt_checkpoint(tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path, _state(), {"round": 1})
    raw = path.read_bytes()
    damaged = {
        "truncate-tail": raw[: len(raw) - 100],
        "truncate-header": raw[:20],
        "garbage": np.random.default_rng(0).bytes(len(raw)),
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    assert "corrupt" in _one_line_error(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_checkpoint_with_nan_is_refused(tmp_path: Path, bad: float) -> None:
    state = _state()
    state["sensor/head.bias"][3] = bad
    path = save_checkpoint(tmp_path, state, {"round": 2})
    assert "sensor/head.bias" in _one_line_error(path)


def _torn_writer(real: Any, crash: BaseException) -> Any:
    """`safetensors.numpy.save_file` crashing half-way: half the file is on disk, then it raises."""

    def write(arrays: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        real(arrays, filename, *args, **kwargs)
        raw = Path(filename).read_bytes()
        Path(filename).write_bytes(raw[: len(raw) // 2])
        raise crash

    return write


@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("part", ["safetensors", "json"])
def test_a_crash_mid_write_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str, crash: BaseException
) -> None:
    """Written atomically: a save that dies half-way through writing a file leaves that file
    exactly as it was before (loadable), and no temp file behind."""
    import safetensors.numpy

    before, info = _state(), {"round": 1, "scenario": "smoke"}
    path = save_checkpoint(tmp_path, before, info)
    saved_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(saved_bytes) == {"checkpoint.safetensors", "checkpoint.json"}

    newer = {k: v + 1 for k, v in before.items()}
    if part == "safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", _torn_writer(safetensors.numpy.save_file, crash))
    else:
        real_write_text = Path.write_text

        def torn_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise crash

        monkeypatch.setattr(Path, "write_text", torn_text)
    with pytest.raises(type(crash)):
        save_checkpoint(tmp_path, newer, {"round": 2, "scenario": "smoke"})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(saved_bytes)  # no temp file left
    assert (tmp_path / "checkpoint.json").read_bytes() == saved_bytes["checkpoint.json"]
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == info
    loaded, loaded_info = load_checkpoint(path)
    if part == "safetensors":  # the crash hit the state itself: the previous one, byte for byte
        assert path.read_bytes() == saved_bytes["checkpoint.safetensors"]
        assert loaded_info == info and all(loaded[k].tobytes() == v.tobytes() for k, v in before.items())
    else:  # the state was already written whole (checkpoint.json only describes it)
        assert loaded_info["round"] == 2 and all(loaded[k].tobytes() == v.tobytes() for k, v in newer.items())
