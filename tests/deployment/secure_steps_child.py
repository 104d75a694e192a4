"""Run in a fresh Python process by test_light_exchanges.py: the secure-aggregation steps that
neither train nor evaluate (mask, check, unmask), through fedge's real ClientApp, as the fresh
`flwr-clientapp` process of a deployment runs each of them.

Three certified watches of one group; the round's first step (keys, which trains) is stood in
for by what it leaves in a device's state: its session (`federation.secagg.protocol.device_keys`,
stored by `clients.secagg._save_session`) and an encoded contribution. The server's side is
`federation.secagg.protocol.ServerRound` with messages built as `server/secagg.py` builds them.
Prints one JSON line: the heavy modules loaded (before and after the handlers) and whether the
server's unmasked sum equals the devices' encoded sum.

Usage: python secure_steps_child.py PKI_DIR
"""

from __future__ import annotations

import json
import sys
from typing import Any

HEAVY = ("torch", "transformers", "peft")


def main(pki_dir: str) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, RecordDict

    from clients.client_app import app  # what flwr-clientapp loads: the app's module
    from clients.secagg import ENCODED, _save_session
    from federation.secagg import pki
    from federation.secagg.packing import unpack_residues
    from federation.secagg.protocol import Expected, Reveal, ServerRound, device_keys, member_ids, plan
    from server.secagg import CHECK, MASK, UNMASK, _message

    loaded_before = [m for m in HEAVY if m in sys.modules]
    run_id, server_round, group, length, clip, bits, max_weight = 77, 2, "sensor", 40, 1.0, 24, 320
    run_config = {"scenario": "deploy-check", "secagg-pki": pki_dir, "secagg-min-devices": 3}
    nodes = [11, 12, 13]
    ids = member_ids(nodes)
    node_of = {pid: node for node, pid in ids.items()}
    params = plan(run_id, server_round, group, len(nodes), length, clip=clip, value_bits=bits,
                  max_weight=max_weight)  # fmt: skip
    expected = Expected(run_id, group, clip, bits, max_weight, 3)
    server = ServerRound(params, ca_public=pki.load_ca_public(pki_dir))
    contexts, encoded = {}, {}
    rng = np.random.default_rng(5)  # test inputs, not masks
    for index, node in enumerate(nodes):
        ctx = Context(run_id=run_id, node_id=node, state=RecordDict(), run_config=dict(run_config),
                      node_config={"device-class": "sensor", "partition-id": index,
                                   "secagg-device-name": f"sensor-{index}",
                                   "secagg-credentials": pki_dir})  # fmt: skip
        # what the keys step leaves on the device
        session, c_public, s_public = device_keys(params, ids[node], expected)
        _save_session(ctx, session)
        encoded[node] = rng.integers(0, 2**20, size=length, dtype=np.uint64)
        ctx.state[ENCODED] = ArrayRecord({"x": Array(encoded[node])})
        credential = pki.load_credential(pki_dir, f"sensor-{index}")
        statement = pki.round_keys_statement(session.params_digest, session.my_id, c_public, s_public)
        signature = pki.sign(credential.private, statement)
        server.add_keys(ids[node], c_public, s_public, (credential.certificate, signature))
        contexts[node] = ctx

    def ok(reply: Any) -> Any:
        if reply.has_error():
            raise SystemExit(f"handler failed: {reply.error.reason}")
        return reply

    for pid in sorted(server.keys):
        peers = server.peer_keys_for(pid)
        creds = server.peer_credentials_for(pid)
        config = {**params.to_config(), "server-round": server_round, "peer-ids": list(peers),
                  "peer-c": [peers[j][0] for j in peers], "peer-s": [peers[j][1] for j in peers],
                  "peer-cert": [creds[j][0] for j in peers],
                  "peer-sig": [creds[j][1] for j in peers]}  # fmt: skip
        reply = ok(app(_message(node_of[pid], MASK, config), contexts[node_of[pid]]))
        shares = reply.content["shares"]
        sealed = {int(j): bytes(ct) for j, ct in zip(shares["to"], shares["sealed"], strict=True)}
        masked = unpack_residues(reply.content["masked"]["y"].numpy(), params.modulus_bits, params.length)
        server.add_masked(pid, sealed, masked)
    survivors = sorted(server.survivors)
    for pid in survivors:
        config = {**params.to_config(), "server-round": server_round, "survivors": survivors}
        reply = ok(app(_message(node_of[pid], CHECK, config), contexts[node_of[pid]]))
        server.add_endorsement(pid, bytes(reply.content["endorsement"]["sig"]))
    for pid in survivors:
        sealed = server.sealed_for(pid)
        endorsements = server.endorsements_for(pid)
        config = {**params.to_config(), "server-round": server_round, "survivors": survivors,
                  "from": list(sealed), "sealed": list(sealed.values()),
                  "endorsers": list(endorsements), "endorsements": list(endorsements.values())}  # fmt: skip
        record = ok(app(_message(node_of[pid], UNMASK, config), contexts[node_of[pid]])).content["reveal"]
        server.add_reveal(pid, Reveal(
            {int(o): bytes(s) for o, s in zip(record["share-owners"], record["shares"], strict=True)},
            {int(j): bytes(s) for j, s in zip(record["pair-ids"], record["pair-seeds"], strict=True)},
            [int(j) for j in record["tampered"]],
        ))  # fmt: skip
    total = server.finish()
    want = sum(encoded.values()) % (2**params.modulus_bits)
    print(json.dumps({
        "loaded-before": loaded_before,
        "loaded-after": [m for m in HEAVY if m in sys.modules],
        "sum-correct": bool(np.array_equal(np.asarray(total, dtype=np.uint64), want.astype(np.uint64))),
        "survivors": len(survivors),
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
