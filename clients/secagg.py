"""The device's side of secure aggregation over Flower messages (protocol: federation/secagg).

Train actions per round: `train.secagg_keys`, `train.secagg_mask`, (with certified keys,
run config `secagg-pki`) `train.secagg_check`, and `train.secagg_unmask`. The first carries the
global state and runs the local training; the device keeps its encoded contribution and its
secrets in the node's `context.state` and replies with public keys only. Every step checks what
the server sent against the device's own run config and session (`federation.secagg.protocol`)
before it computes anything; a refusal raises, so the server sees an error reply and the
device's secrets stay where they are. No reply ever holds the device's update, its weight, or
a secret in the clear.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.device import _setup, train_locally
from clients.exchange_log import phase, timed

SESSION = "fedge.secagg"  # context.state: this round's secrets and peers (device-local)
ENCODED = "fedge.secagg.input"  # context.state: the encoded (unmasked) contribution


def _params(msg: Message, context: Context):  # -> federation.secagg.protocol.Params
    from federation.secagg.protocol import ParameterError, Params

    params = Params.from_config(msg.content["config"])
    if params.run_id != context.run_id % 2**63:
        raise ParameterError(
            f"secure-aggregation message for run {params.run_id}, this is run {context.run_id % 2**63}"
        )
    return params


def _expected(context: Context):  # -> federation.secagg.protocol.Expected
    from federation.secagg.protocol import Expected

    run, device = _setup(context)
    return Expected(
        run_id=context.run_id % 2**63,
        group=device.task,
        clip=run.secagg_clip,
        value_bits=run.secagg_value_bits,
        max_weight=1 if run.dp else run.task_max_weight(device.task),
        min_devices=run.secagg_min_devices,
        dp_mechanism=run.dp_mechanism,
        dp_noise_multiplier=run.dp_noise_multiplier if run.dp else 0.0,
        dp_clip=run.dp_clip if run.dp else 0.0,
    )


def _run_setting(context: Context, key: str) -> Any:
    """One run-config value, read without parsing the whole run config.

    `RunConfig.parse` builds the model's and training's settings, whose modules import torch;
    the exchanges that neither train nor evaluate (mask, check, unmask) need a setting or two
    and must not pay that import in their fresh process. The same round's first step (keys,
    which trains) parsed and validated this very run config."""
    from federation.defaults import run_default

    return context.run_config.get(key, run_default(key))


def _pki(context: Context):  # -> (ca public key, this device's credential) or None
    """With run config `secagg-pki`: the CA's public key and this device's certified key.

    A deployed device names its credential with node config `secagg-device-name` and finds it in
    node config `secagg-credentials` (a folder holding `devices/<name>.key` and `.cert`: only its
    own, on a real device); a simulated one is `partition-<id>`, in the `secagg-pki` folder."""
    from federation.secagg import pki

    ca_dir = str(_run_setting(context, "secagg-pki"))
    if not ca_dir:
        return None
    name = context.node_config.get("secagg-device-name")
    if not name:
        name = pki.device_name_for(int(context.node_config["partition-id"]))
    own_dir = str(context.node_config.get("secagg-credentials") or ca_dir)
    return pki.load_ca_public(ca_dir), pki.load_credential(own_dir, str(name))


def _save_session(
    context: Context,
    session: Any,
    peers: dict[int, tuple[bytes, bytes]] | None = None,
    identities: dict[int, bytes] | None = None,
) -> None:
    record = ConfigRecord(
        {
            "my-id": session.my_id,
            "digest": session.params_digest,
            "c": session.c_private,
            "s": session.s_private,
            "b": session.self_seed,
            "masked-with": list(session.masked_with),
            "survivors": list(session.survivors),
            "revealed": session.revealed,
        }
    )
    old = context.state.get(SESSION)
    if peers is None and isinstance(old, ConfigRecord):  # keep what step 2 stored
        for key in ("peer-ids", "peer-c", "peer-s", "identity-ids", "identity-keys"):
            if key in old:
                record[key] = old[key]
    if peers is not None:
        record["peer-ids"] = list(peers)
        record["peer-c"] = [peers[j][0] for j in peers]
        record["peer-s"] = [peers[j][1] for j in peers]
    if identities is not None:
        record["identity-ids"] = list(identities)
        record["identity-keys"] = [identities[j] for j in identities]
    context.state[SESSION] = record


def _load_session(context: Context):  # -> (DeviceSession, peer keys, peer identities)
    from federation.secagg.protocol import DeviceSession, ParameterError

    record = context.state.get(SESSION)
    if not isinstance(record, ConfigRecord):
        raise ParameterError(
            "no secure-aggregation session on this device: the round's first step never reached it"
        )
    session = DeviceSession(
        int(record["my-id"]),
        bytes(record["digest"]),
        bytes(record["c"]),
        bytes(record["s"]),
        bytes(record["b"]),
        tuple(int(j) for j in record.get("masked-with", [])),
        tuple(int(j) for j in record.get("survivors", [])),
        bool(record.get("revealed", False)),
    )
    peers = {
        int(j): (bytes(c), bytes(s))
        for j, c, s in zip(
            record.get("peer-ids", []), record.get("peer-c", []), record.get("peer-s", []), strict=True
        )
    }
    identities = {
        int(j): bytes(k)
        for j, k in zip(record.get("identity-ids", []), record.get("identity-keys", []), strict=True)
    }
    return session, peers, identities


def _forget(context: Context) -> None:
    for key in (SESSION, ENCODED):
        if key in context.state:
            del context.state[key]


def _reply(msg: Message, server_round: int, **records: Any) -> Message:
    return Message(
        RecordDict({**records, "metrics": MetricRecord({"server-round": server_round})}), reply_to=msg
    )


def secagg_keys(msg: Message, context: Context) -> Message:
    """Step 1: check the round's parameters, train, encode the contribution (kept here), reply
    with two public keys (signed with the device's certified key under a PKI)."""
    from federation.secagg import pki
    from federation.secagg.protocol import ParameterError, device_keys
    from federation.secagg.vector import encode_update

    _forget(context)  # a new round: never reuse a previous round's secrets
    params = _params(msg, context)
    config = msg.content["config"]
    if params.server_round != int(config["server-round"]):
        raise ParameterError("secure-aggregation parameters are for another round")
    # checked before training: a downgraded or replayed round costs the device nothing
    with phase("run config (imports torch)"):
        expected = _expected(context)
    with phase("crypto"):
        session, c_public, s_public = device_keys(params, int(config["sa-my-id"]), expected)
    certified = _pki(context)
    run, _, result, server_round = train_locally(msg, context)
    shapes = {k: tuple(v.shape) for k, v in result.delta.items()}
    weight = int(result.metrics["num-examples"])
    with phase("crypto"):
        encoded = encode_update(
            run.rule, result.delta, weight, shapes, params, rank=result.rank, classes=result.classes
        )
    _save_session(context, session)
    context.state[ENCODED] = ArrayRecord({"x": Array(encoded)})
    keys = ConfigRecord({"c-pk": c_public, "s-pk": s_public})
    if certified is not None:
        _, credential = certified
        statement = pki.round_keys_statement(session.params_digest, session.my_id, c_public, s_public)
        keys["cert"] = credential.certificate
        with phase("crypto"):
            keys["sig"] = pki.sign(credential.private, statement)
    metrics = MetricRecord(
        {"server-round": server_round, "train_loss": result.metrics["train_loss"],
         "train_seconds": result.metrics["train_seconds"]}
    )  # fmt: skip
    return Message(RecordDict({"keys": keys, "metrics": metrics}), reply_to=msg)


def _simulated_dropout(context: Context, params: Any) -> bool:
    """Simulation knob `dropout-after-keys`: this device vanishes after sharing its keys.

    The draw is keyed on the run's seed, the round and the device's data, not on Flower's
    random node and run ids, so the same run config drops the same devices every time."""
    if float(_run_setting(context, "dropout-after-keys")) <= 0:
        return False  # decided before anything imports torch (a deployment never sets it)
    from federation.data.common import stable_seed

    run, device = _setup(context)
    draw = stable_seed("secagg-dropout", run.seed, params.server_round, device.data_client) % 10_000
    return draw < run.dropout_after_keys * 10_000


def secagg_mask(msg: Message, context: Context) -> Message:
    """Step 2: check the neighbours' keys, seal shares of our self-mask seed for them, reply the
    masked vector packed to m bits per coordinate."""
    from federation.secagg.packing import pack_residues
    from federation.secagg.protocol import ParameterError, check_peer_keys, device_mask

    params = _params(msg, context)
    if _simulated_dropout(context, params):
        _forget(context)
        raise RuntimeError("simulated dropout after sharing keys (run config dropout-after-keys)")
    config = msg.content["config"]
    session, _, _ = _load_session(context)
    peers = {
        int(j): (bytes(c), bytes(s))
        for j, c, s in zip(config["peer-ids"], config["peer-c"], config["peer-s"], strict=True)
    }
    identities: dict[int, bytes] = {}
    certified = _pki(context)
    if certified is not None:
        ca_public, credential = certified
        credentials = {
            int(j): (bytes(c), bytes(s))
            for j, c, s in zip(
                config.get("peer-ids", []),
                config.get("peer-cert", []),
                config.get("peer-sig", []),
                strict=True,
            )
        }
        with phase("crypto"):
            identities = check_peer_keys(
                session, params, peers, ca_public=ca_public, credentials=credentials,
                my_certificate=credential.certificate,
            )  # fmt: skip
    if ENCODED not in context.state:
        raise ParameterError("this device already sent its masked vector in this round")
    encoded = context.state[ENCODED]["x"].numpy()
    with phase("crypto"):
        sealed, masked = device_mask(session, params, peers, encoded)
        residues = pack_residues(masked, params.modulus_bits)
    _save_session(context, session, peers, identities)
    del context.state[ENCODED]  # from here on only the masked vector exists
    shares = ConfigRecord({"to": list(sealed), "sealed": [sealed[j] for j in sealed]})
    packed = ArrayRecord({"y": Array(residues)})
    return _reply(msg, params.server_round, shares=shares, masked=packed)


def secagg_check(msg: Message, context: Context) -> Message:
    """Step 3 (certified keys): check the announced survivor set and sign it (consistency check)."""
    from federation.secagg.protocol import ParameterError, device_endorse

    params = _params(msg, context)
    certified = _pki(context)
    if certified is None:
        raise ParameterError("this device holds no certified key (run config secagg-pki is empty)")
    session, _, _ = _load_session(context)
    with phase("crypto"):
        signature = device_endorse(
            session, params, [int(j) for j in msg.content["config"]["survivors"]], certified[1].private
        )
    _save_session(context, session)
    return _reply(msg, params.server_round, endorsement=ConfigRecord({"sig": signature}))


def secagg_unmask(msg: Message, context: Context) -> Message:
    """Last step: reveal survivors' seed shares and pairwise seeds with the vanished; then forget."""
    from federation.secagg.protocol import device_unmask

    params = _params(msg, context)
    config = msg.content["config"]
    session, peers, identities = _load_session(context)
    sealed = {int(j): bytes(ct) for j, ct in zip(config["from"], config["sealed"], strict=True)}
    endorsements = {
        int(j): bytes(sig)
        for j, sig in zip(config.get("endorsers", []), config.get("endorsements", []), strict=True)
    }
    certified = _pki(context)
    with phase("crypto"):
        reveal = device_unmask(
            session,
            params,
            [int(j) for j in config["survivors"]],
            sealed,
            peers,
            endorsements=endorsements,
            identities=identities if certified is not None else None,
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
    return _reply(msg, params.server_round, reveal=record)


def register_secure_handlers(app: ClientApp) -> None:
    """Register the secure-aggregation steps on `app` as train actions `train.secagg_*` (called
    once, explicitly, by clients/client_app.py: no registration by import side effect)."""
    for stage, handler in (
        ("secagg_keys", secagg_keys),
        ("secagg_mask", secagg_mask),
        ("secagg_check", secagg_check),
        ("secagg_unmask", secagg_unmask),
    ):
        app.train(stage)(timed(f"train.{stage}")(handler))
