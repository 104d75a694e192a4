"""Who each device is: its class, its hardware tier (hence its LoRA rank), its task and which
real data client it holds.

In simulation a node knows only its `partition-id`; the scenario maps it onto the fleet (class,
tier, data client). In deployment a SuperNode says it with
`--node-config "device-class='phone' tier='mid' data-client='hamlet/HAM'"` (or `device-class` +
`partition-id`, the index within its class; without `tier`, the scenario's tier for that index,
else the class's top tier).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from federation.data.common import stable_seed
from federation.devices import (
    DeviceProfile,
    class_tiers,
    default_catalogue,
    device_classes,
    top_tier,
)
from federation.errors import FedgeError
from federation.scenarios import Scenario, class_task_name, partition_device
from federation.tasks import get_task


@dataclass(frozen=True)
class Device:
    """One device: its class and tier (from the device catalogue), the task its class runs, and
    the data client it holds."""

    device_class: str
    data_client: str
    tier: str = ""  # hardware tier in the device catalogue; "" -> the class's top tier
    profile: DeviceProfile = field(init=False, repr=False)
    rank: int = field(init=False)  # the tier's LoRA rank (`lora_rank` in the catalogue)
    batch_size: int = field(init=False)  # the largest batch the tier's memory budget allows

    def __post_init__(self) -> None:
        catalogue = default_catalogue()
        if not class_tiers(self.device_class, catalogue):
            known = ", ".join(device_classes(catalogue))
            raise FedgeError(f"unknown device class {self.device_class!r}: use one of {known}")
        tier = self.tier or top_tier(self.device_class, catalogue)
        profile = catalogue.get((self.device_class, tier))
        if profile is None:
            raise FedgeError(
                f"unknown tier {tier!r} of {self.device_class}: use one of "
                f"{', '.join(class_tiers(self.device_class, catalogue))}"
            )
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "profile", profile)
        object.__setattr__(self, "rank", profile.lora_rank)
        object.__setattr__(self, "batch_size", profile.batch_size)

    @property
    def task(self) -> str:
        """The name of the task the device's class runs (resolved in `federation.tasks`)."""
        return get_task(self.profile.task).info.name


def all_data_clients(device_class: str, cache: str = "") -> tuple[str, ...]:
    """Every natural client of the dataset of the class's task, in a fixed order."""
    return _task_clients(class_task_name(device_class), cache)


@functools.lru_cache(maxsize=8)
def _task_clients(task: str, cache: str) -> tuple[str, ...]:
    return tuple(get_task(task).clients(Path(cache) if cache else None))


@functools.lru_cache(maxsize=32)
def fleet_data_clients(device_class: str, count: int, seed: int, cache: str = "") -> tuple[str, ...]:
    """The data clients held by a scenario's `count` devices of a class: a seeded draw."""
    pool = all_data_clients(device_class, cache)
    if count > len(pool):
        raise FedgeError(
            f"the fleet asks for {count} {device_class} devices but the dataset has {len(pool)} clients: "
            "use fewer, or a synthetic scenario that shards the natural clients"
        )
    rng = np.random.default_rng(stable_seed("fleet", seed, device_class))
    return tuple(pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False)))


SHARD = "#"  # "hamlet/HAM#3/17": shard 3 of 17 of a natural client (synthetic scale scenarios)


def synthetic_data_client(device_class: str, index: int, count: int, seed: int, cache: str = "") -> str:
    """The data of device `index` of `count` when there are more devices than natural clients.

    Device i holds shard i // P of natural client perm(i mod P), P the natural clients: every
    natural client is split into ceil(count / P) shards of its train and held-out splits.
    Computed per device, so nothing grows with the fleet.
    """
    pool = all_data_clients(device_class, cache)
    shards = -(-count // len(pool))
    order = _client_permutation(device_class, len(pool), seed)
    return f"{pool[order[index % len(pool)]]}{SHARD}{index // len(pool)}/{shards}"


@functools.lru_cache(maxsize=8)
def _client_permutation(device_class: str, n: int, seed: int) -> tuple[int, ...]:
    return tuple(
        int(i) for i in np.random.default_rng(stable_seed("fleet-shards", seed, device_class)).permutation(n)
    )


def device_for_partition(scenario: Scenario, partition_id: int, seed: int, cache: str = "") -> Device:
    if not 0 <= partition_id < scenario.size:
        raise FedgeError(
            f"partition-id {partition_id} is outside scenario {scenario.name!r}'s fleet of {scenario.size}: "
            f"run with --federation-config 'num-supernodes={scenario.size}'"
        )
    device_class, index = partition_device(scenario, partition_id)
    count = scenario.fleet[device_class]
    if scenario.synthetic:
        client = synthetic_data_client(device_class, index, count, seed, cache)
    else:
        client = fleet_data_clients(device_class, count, seed, cache)[index]
    return Device(device_class, client, scenario.tier_of(device_class, index))


def _node_tier(node_config: Mapping[str, Any], device_class: str, default: str) -> str:
    tier = node_config.get("tier")
    if tier is None:
        return default
    tiers = class_tiers(device_class)
    if str(tier) not in tiers:
        raise FedgeError(
            f"node config tier={tier!r} is not a {device_class} tier: use one of {', '.join(tiers)}"
        )
    return str(tier)


def device_from_node_config(
    node_config: Mapping[str, Any], scenario: Scenario, seed: int, cache: str = ""
) -> Device:
    """Resolve a node's device from its node config (simulation or deployment).

    `tier` in the node config, where given, overrides the tier the scenario assigns.
    """
    device_class = node_config.get("device-class")
    if device_class is None:
        if "partition-id" not in node_config:
            raise FedgeError(
                "node config needs device-class (+ data-client or partition-id) or a partition-id"
            )
        device = device_for_partition(scenario, int(node_config["partition-id"]), seed, cache)
        return Device(
            device.device_class, device.data_client, _node_tier(node_config, device.device_class, device.tier)
        )
    device_class = str(device_class)
    if not class_tiers(device_class):
        raise FedgeError(
            f"node config device-class={device_class!r}: use one of {', '.join(device_classes())}"
        )
    if "data-client" in node_config:
        client = str(node_config["data-client"])
        if client not in all_data_clients(device_class, cache):
            raise FedgeError(
                f"node config data-client={client!r} is not a {device_class} client of the dataset"
            )
        return Device(device_class, client, _node_tier(node_config, device_class, ""))
    index = int(node_config.get("partition-id", 0))
    in_fleet = index < scenario.fleet.get(device_class, 0)
    tier = _node_tier(node_config, device_class, scenario.tier_of(device_class, index) if in_fleet else "")
    count = max(scenario.fleet.get(device_class, 0), index + 1)
    return Device(device_class, fleet_data_clients(device_class, count, seed, cache)[index], tier)


def load_device_data(device: Device, seed: int, seq_len: int = 32, cache: str = "") -> Any:
    """The device's own train + held-out data (tokenised/windowed once, cached on disk)."""
    return _load_client_data(device.task, device.data_client, seed, seq_len, cache)


@functools.lru_cache(maxsize=64)  # by data client, not by device: a tier does not change the data
def _load_client_data(task: str, data_client: str, seed: int, seq_len: int, cache: str) -> Any:
    if SHARD in data_client:
        base, _, shard = data_client.rpartition(SHARD)
        k, _, n = shard.partition("/")
        return _shard(_load_client_data(task, base, seed, seq_len, cache), int(k), int(n))
    cache_path = Path(cache) if cache else None
    return get_task(task).load_client(data_client, seed, seq_len=seq_len, cache=cache_path)


def _shard(data: Any, k: int, n: int) -> Any:
    """Every n-th example from the k-th, of each split (train and held-out stay disjoint)."""
    import dataclasses

    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    out = {}
    for name, value in fields.items():
        if hasattr(value, "shape") and len(value) > 0:
            picked = value[k::n]
            out[name] = picked if len(picked) else value[:1]  # never empty: keep one example
        else:
            out[name] = value
    return type(data)(**out)
