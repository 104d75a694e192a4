"""ClientApp in Flower's legacy compat format, behind `secaggplus_mod` when `secure` is set.

Each device trains its own task's part of the full state with fedge's local training and
returns the full parameter list (other tasks' parts unchanged): the legacy strategy averages
one list for everyone, and SecAgg+ masks all of it.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from legacy_anchor.common import global_keys_and_state, run_config


def maybe_secagg(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    # ClientApp mods are fixed at import; the run config decides per run.
    if context.run_config.get("secure", True):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[maybe_secagg])


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from federation.fleet import device_for_partition, load_device_data
    from federation.local import local_train
    from federation.model.edge import task_slice

    torch.set_num_threads(1)
    run = run_config(context.run_config)
    keys, _ = global_keys_and_state(run)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    full = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    device = device_for_partition(run.scenario, int(context.node_config["partition-id"]), run.seed)
    shared = task_slice(full, device.task)
    server_round = int(fitins.config.get("round", 1))
    result = local_train(run, device, load_device_data(device, run.seed, run.seq_len), shared, server_round)
    for key, delta in result.delta.items():
        full[f"{device.task}/{key}"] = shared[key] + delta
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([full[k] for k in keys]),
        int(result.metrics["num-examples"]),
        {"train_loss": float(result.metrics["train_loss"])},
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
