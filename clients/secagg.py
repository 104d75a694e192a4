"""The device's side of secure aggregation over Flower messages (protocol: federation/secagg).

Three train actions per round (`train.secagg_keys`, `train.secagg_mask`, `train.secagg_unmask`).
The first carries the global state and runs the local training; the device keeps its encoded
contribution and its secrets in the node's `context.state` and replies with public keys only.
No reply ever holds the device's update, its weight, or a secret in the clear.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.client_app import _setup, app, train_locally

SESSION = "fedge.secagg"  # context.state: this round's secrets and peers (device-local)
ENCODED = "fedge.secagg.input"  # context.state: the encoded (unmasked) contribution


def _params(msg: Message, context: Context):  # -> federation.secagg.protocol.Params
    from federation.secagg.protocol import Params

    params = Params.from_config(msg.content["config"])
    if params.run_id != context.run_id % 2**63:
        raise ValueError(f"secure-aggregation message for run {params.run_id}, this is run {context.run_id}")
    return params


def _save_session(
    context: Context, session: Any, peers: dict[int, tuple[bytes, bytes]] | None = None
) -> None:
    record = ConfigRecord(
        {
            "my-id": session.my_id,
            "digest": session.params_digest,
            "c": session.c_private,
            "s": session.s_private,
            "b": session.self_seed,
            "masked-with": list(session.masked_with),
            "shared-with": list(session.shared_with),
        }
    )
    if peers is not None:
        record["peer-ids"] = list(peers)
        record["peer-c"] = [peers[j][0] for j in peers]
        record["peer-s"] = [peers[j][1] for j in peers]
    context.state[SESSION] = record


def _load_session(context: Context):  # -> (DeviceSession, peer keys)
    from federation.secagg.protocol import DeviceSession

    record = context.state.get(SESSION)
    if not isinstance(record, ConfigRecord):
        raise ValueError(
            "no secure-aggregation session on this device: the round's first step never reached it"
        )
    session = DeviceSession(
        int(record["my-id"]),
        bytes(record["digest"]),
        bytes(record["c"]),
        bytes(record["s"]),
        bytes(record["b"]),
        tuple(int(j) for j in record.get("masked-with", [])),
        tuple(int(j) for j in record.get("shared-with", [])),
    )
    peers = {
        int(j): (bytes(c), bytes(s))
        for j, c, s in zip(
            record.get("peer-ids", []), record.get("peer-c", []), record.get("peer-s", []), strict=True
        )
    }
    return session, peers


def _forget(context: Context) -> None:
    for key in (SESSION, ENCODED):
        if key in context.state:
            del context.state[key]


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Step 1: train, encode the contribution (kept here), reply with two public keys."""
    from federation.secagg.protocol import device_keys
    from federation.secagg.vector import encode_update

    _forget(context)  # a new round: never reuse a previous round's secrets
    params = _params(msg, context)
    _, _, result, server_round = train_locally(msg, context)
    if params.server_round != server_round:
        raise ValueError("secure-aggregation parameters are for another round")
    shapes = {k: tuple(v.shape) for k, v in result.delta.items()}
    weight = int(result.metrics["num-examples"])
    encoded = encode_update(result.delta, weight, shapes, params, rank=result.rank)
    session, c_public, s_public = device_keys(params, int(msg.content["config"]["sa-my-id"]))
    _save_session(context, session)
    context.state[ENCODED] = ArrayRecord({"x": Array(encoded)})
    keys = ConfigRecord({"c-pk": c_public, "s-pk": s_public})
    metrics = MetricRecord(
        {"server-round": server_round, "train_loss": result.metrics["train_loss"],
         "train_seconds": result.metrics["train_seconds"]}
    )  # fmt: skip
    return Message(RecordDict({"keys": keys, "metrics": metrics}), reply_to=msg)


def _simulated_dropout(context: Context, params: Any) -> bool:
    """Simulation knob `dropout-after-keys`: this device vanishes after sharing its keys.

    The draw is keyed on the run's seed, the round and the device's data, not on Flower's
    random node and run ids, so the same run config drops the same devices every time."""
    from federation.data.common import stable_seed

    run, device = _setup(context)
    if run.dropout_after_keys <= 0:
        return False
    draw = stable_seed("secagg-dropout", run.seed, params.server_round, device.data_client) % 10_000
    return draw < run.dropout_after_keys * 10_000


@app.train("secagg_mask")
def secagg_mask(msg: Message, context: Context) -> Message:
    """Step 2: seal shares of our self-mask seed for the neighbours; reply the masked vector."""
    from federation.secagg.protocol import device_mask

    params = _params(msg, context)
    if _simulated_dropout(context, params):
        _forget(context)
        raise RuntimeError("simulated dropout after sharing keys (run config dropout-after-keys)")
    config = msg.content["config"]
    session, _ = _load_session(context)
    peers = {
        int(j): (bytes(c), bytes(s))
        for j, c, s in zip(config["peer-ids"], config["peer-c"], config["peer-s"], strict=True)
    }
    encoded = context.state[ENCODED]["x"].numpy()
    sealed, masked = device_mask(session, params, peers, encoded)
    _save_session(context, session, peers)
    del context.state[ENCODED]  # from here on only the masked vector exists
    shares = ConfigRecord({"to": list(sealed), "sealed": [sealed[j] for j in sealed]})
    return Message(
        RecordDict(
            {
                "shares": shares,
                "masked": ArrayRecord({"y": Array(masked)}),
                "metrics": MetricRecord({"server-round": params.server_round}),
            }
        ),
        reply_to=msg,
    )


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Step 3: reveal survivors' seed shares and pairwise seeds with the vanished; then forget."""
    from federation.secagg.protocol import device_unmask

    params = _params(msg, context)
    config = msg.content["config"]
    session, peers = _load_session(context)
    sealed = {int(j): bytes(ct) for j, ct in zip(config["from"], config["sealed"], strict=True)}
    reveal = device_unmask(
        session,
        params,
        [int(j) for j in config["survivors"]],
        [int(j) for j in config["vanished"]],
        sealed,
        peers,
    )
    _forget(context)
    record = ConfigRecord(
        {
            "share-owners": list(reveal.self_seed_shares),
            "shares": list(reveal.self_seed_shares.values()),
            "pair-ids": list(reveal.pair_seeds),
            "pair-seeds": list(reveal.pair_seeds.values()),
            "tampered": reveal.tampered,
        }
    )
    return Message(
        RecordDict({"reveal": record, "metrics": MetricRecord({"server-round": params.server_round})}),
        reply_to=msg,
    )
