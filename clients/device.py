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


def train_locally(msg: Message, context: Context):
    """The round's local work, shared by plain and secure rounds: (run, device, result, round).

    A TV's updated private part goes to the node's state here; it is never part of a reply.
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
    result = local_train(run, device, data, shared, server_round, _stored_private(context))
    record("training", result.metrics["train_seconds"])
    record("model", time.perf_counter() - started - result.metrics["train_seconds"])
    if result.private is not None:
        context.state[PRIVATE_KEY] = ArrayRecord({"user": _array(result.private)})
    return run, device, result, server_round


def _array(value):
    from flwr.app import Array

    return Array(value)
