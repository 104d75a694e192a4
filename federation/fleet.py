"""Who each device is: its class, its task and which real data client it holds.

In simulation a node knows only its `partition-id`; the scenario maps it onto the fleet. In
deployment a SuperNode says it with `--node-config "device-class='phone' data-client='hamlet/HAM'"`
(or `device-class` + `partition-id`, the index within its class).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from federation.data.common import stable_seed
from federation.errors import FedgeError
from federation.scenarios import DEVICE_TASK, Scenario, fleet_order


@dataclass(frozen=True)
class Device:
    device_class: str
    data_client: str

    @property
    def task(self) -> str:
        return DEVICE_TASK[self.device_class]


@functools.lru_cache(maxsize=8)
def all_data_clients(device_class: str, cache: str = "") -> tuple[str, ...]:
    """Every natural client of the class's dataset, in a fixed order."""
    cache_path = Path(cache) if cache else None
    if device_class == "phone":
        from federation.data.phone import phone_clients

        return tuple(phone_clients(cache=cache_path))
    if device_class == "tv":
        from federation.data.tv import tv_clients

        return tuple(tv_clients(cache=cache_path))
    if device_class == "sensor":
        from federation.data.sensor import sensor_clients

        return tuple(sensor_clients())
    raise FedgeError(f"unknown device class {device_class!r}: use one of {', '.join(DEVICE_TASK)}")


@functools.lru_cache(maxsize=32)
def fleet_data_clients(device_class: str, count: int, seed: int, cache: str = "") -> tuple[str, ...]:
    """The data clients held by a scenario's `count` devices of a class: a seeded draw."""
    pool = all_data_clients(device_class, cache)
    if count > len(pool):
        raise FedgeError(
            f"the fleet asks for {count} {device_class} devices but the dataset has {len(pool)} clients"
        )
    rng = np.random.default_rng(stable_seed("fleet", seed, device_class))
    return tuple(pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False)))


def device_for_partition(scenario: Scenario, partition_id: int, seed: int, cache: str = "") -> Device:
    order = fleet_order(scenario)
    if not 0 <= partition_id < len(order):
        raise FedgeError(
            f"partition-id {partition_id} is outside scenario {scenario.name!r}'s fleet of {len(order)}: "
            f"run with --federation-config 'num-supernodes={len(order)}'"
        )
    device_class, index = order[partition_id]
    clients = fleet_data_clients(device_class, scenario.fleet[device_class], seed, cache)
    return Device(device_class, clients[index])


def device_from_node_config(
    node_config: Mapping[str, Any], scenario: Scenario, seed: int, cache: str = ""
) -> Device:
    """Resolve a node's device from its node config (simulation or deployment)."""
    device_class = node_config.get("device-class")
    if device_class is None:
        if "partition-id" not in node_config:
            raise FedgeError(
                "node config needs device-class (+ data-client or partition-id) or a partition-id"
            )
        return device_for_partition(scenario, int(node_config["partition-id"]), seed, cache)
    device_class = str(device_class)
    if device_class not in DEVICE_TASK:
        raise FedgeError(f"node config device-class={device_class!r}: use one of {', '.join(DEVICE_TASK)}")
    if "data-client" in node_config:
        client = str(node_config["data-client"])
        if client not in all_data_clients(device_class, cache):
            raise FedgeError(
                f"node config data-client={client!r} is not a {device_class} client of the dataset"
            )
        return Device(device_class, client)
    index = int(node_config.get("partition-id", 0))
    count = max(scenario.fleet.get(device_class, 0), index + 1)
    return Device(device_class, fleet_data_clients(device_class, count, seed, cache)[index])


@functools.lru_cache(maxsize=64)
def load_device_data(device: Device, seed: int, seq_len: int = 32, cache: str = "") -> Any:
    """The device's own train + held-out data (tokenised/windowed once, cached on disk)."""
    cache_path = Path(cache) if cache else None
    if device.task == "phone":
        from federation.data.phone import load_phone_client

        return load_phone_client(device.data_client, seed, seq_len=seq_len, cache=cache_path)
    if device.task == "tv":
        from federation.data.tv import load_tv_client

        return load_tv_client(device.data_client, seed, cache=cache_path)
    from federation.data.sensor import load_sensor_client

    return load_sensor_client(device.data_client, seed)


def num_train_examples(device: Device, data: Any) -> int:
    if device.task == "phone":
        return len(data.train)
    if device.task == "tv":
        return len(data.train_items)
    return len(data.train_x)
