"""fedge's ClientApp (Flower Message API).

Three message handlers:
- `query` (check-in): which device class / task / data this node is, and how many examples;
- `train`: load the task's global shared state, train locally, reply with the *delta* and
  metrics (num-examples, loss, train seconds, upload bytes). A TV's private part lives in the
  node's `context.state` and never leaves the device;
- `evaluate`: summed held-out results for the node's task;
- `train.secagg_keys` / `train.secagg_mask` / `train.secagg_unmask`: the device's side of
  secure aggregation (`clients/secagg.py`), the default.

Module imports stay light (no torch at import): a SuperNode starts a fresh process per message
(Flower 1.42), and importing torch/peft there is paid per message. Only the handlers that train or
evaluate (query's data check, train, evaluate, `train.secagg_keys`) import torch, transformers and
peft; secure aggregation's mask, check and unmask steps run on numpy and `cryptography` alone
(tests/deployment/test_light_exchanges.py). Heavy objects (backbones, data) are cached per
process. With `FEDGE_EXCHANGE_LOG` set, every handler logs where its seconds went
(`clients/exchange_log.py`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.device import PRIVATE_KEY, _array, _data, _setup, _stored_kept, _stored_private, train_locally
from clients.exchange_log import timed
from clients.secagg import register_secure_handlers

__all__ = ["PRIVATE_KEY", "app"]

app = ClientApp()


@app.query()
@timed("query")
def checkin(msg: Message, context: Context) -> Message:
    """Tell the server who this device is: class, task, tier and rank. No data or data size
    leaves (the aggregation weight stays inside the masked vectors). The data is loaded here so
    that a missing dataset fails at check-in, not in round 1."""
    run, device = _setup(context)
    _data(run, device)
    info = ConfigRecord(
        {"device-class": device.device_class, "task": device.task, "data-client": device.data_client}
    )
    info["tier"] = device.tier  # hardware tier (device catalogue)
    info["rank"] = device.rank  # the tier's LoRA rank
    return Message(RecordDict({"device": info}), reply_to=msg)


@app.train()
@timed("train")
def train(msg: Message, context: Context) -> Message:
    """A plain round (secure-aggregation = false): the server sees this device's update."""
    import numpy as np

    from federation.rules.base import device_upload

    run, _, result, server_round = train_locally(msg, context)
    # The upload is what the run's aggregation rule asks of a device (the default: its
    # contribution to the round's sum, weighted delta + weights).
    upload = device_upload(
        run.rule, result.delta, result.metrics["num-examples"], result.rank, result.classes
    )
    arrays = ArrayRecord({k: _array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in upload.items()})
    metrics = dict(result.metrics)
    metrics["server-round"] = server_round
    metrics["upload-bytes"] = arrays.count_bytes()
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
@timed("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    from federation.local import local_evaluate

    run, device = _setup(context)
    config = msg.content["config"]
    if config.get("task") != device.task:
        raise ValueError(f"server sent task {config.get('task')!r} to a {device.task} device")
    shared = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    sums = local_evaluate(
        run, device, _data(run, device), shared, _stored_private(context), _stored_kept(context)
    )
    metrics = MetricRecord(
        {**sums, "num-examples": int(sums["count"]), "server-round": int(config["server-round"])}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


register_secure_handlers(app)  # train.secagg_*: the device's side of secure aggregation
