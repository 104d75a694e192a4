"""A device's local work, shared by the plain and the secure ClientApp handlers: its run config
and identity from the node, its data, its private part, and one round's local training.

No handler lives here, so `clients/client_app.py` (plain handlers, and the registration of the
secure ones) and `clients/secagg.py` (the secure handlers) both import it without importing
each other.
"""

from __future__ import annotations

import os
import time

from flwr.app import ArrayRecord, Context, Message

PRIVATE_KEY = "fedge.private"  # context.state key of a device's private part (never sent)
KEPT_PREFIX = "rule:"  # in that record: what the run's aggregation rule keeps on the device (never sent)


def _setup(context: Context):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from federation.config import RunConfig
    from federation.fleet import device_from_node_config

    run = RunConfig.parse(context.run_config)
    torch.set_num_threads(run.client_threads)
    device = device_from_node_config(context.node_config, run.scenario, run.seed, run.cache_dir)
    return run, device


def _data(run, device):
    from federation.fleet import load_device_data

    return load_device_data(device, run.seed, run.seq_len, run.cache_dir)


def _stored_private(context: Context):
    record = context.state.get(PRIVATE_KEY)
    if isinstance(record, ArrayRecord) and "user" in record:
        return record["user"].numpy()
    return None


def _stored_kept(context: Context) -> dict:
    """What the aggregation rule keeps on this device between rounds (FedSA-LoRA's B, HetLoRA's
    pruned rank), from the same node-state record as the task's private part."""
    record = context.state.get(PRIVATE_KEY)
    if not isinstance(record, ArrayRecord):
        return {}
    return {k[len(KEPT_PREFIX) :]: v.numpy() for k, v in record.items() if k.startswith(KEPT_PREFIX)}


def _store(context: Context, private, kept: dict) -> None:
    """Keep the task's private part and the rule's device-kept state in the node's state."""
    record = context.state.get(PRIVATE_KEY)
    arrays = dict(record.items()) if isinstance(record, ArrayRecord) else {}
    if private is not None:
        arrays["user"] = _array(private)
    for key, value in kept.items():
        arrays[KEPT_PREFIX + key] = _array(value)
    if arrays:
        context.state[PRIVATE_KEY] = ArrayRecord(arrays)


def train_locally(msg: Message, context: Context):
    """The round's local work, shared by plain and secure rounds: (run, device, result, round).

    A TV's updated private part, and what the aggregation rule keeps on the device, go to the
    node's state here; neither is ever part of a reply.
    """
    from clients.exchange_log import enabled, phase, record

    with phase("imports (model code: torch, transformers, peft)"):
        from federation.local import local_train

        if enabled():  # measured apart from the model build, which imports it anyway
            import peft  # noqa: F401
    with phase("run config"):
        run, device = _setup(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if config.get("task") != device.task:
        raise ValueError(f"server sent task {config.get('task')!r} to a {device.task} device")
    shared = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    with phase("data"):
        data = _data(run, device)
    started = time.perf_counter()
    private, kept = _stored_private(context), _stored_kept(context)
    result = local_train(run, device, data, shared, server_round, private, kept)
    record("training", result.metrics["train_seconds"])
    record("model", time.perf_counter() - started - result.metrics["train_seconds"])
    _store(context, result.private, result.kept)
    return run, device, result, server_round


def _array(value):
    from flwr.app import Array

    return Array(value)
