"""The same apps on Flower's deployment engine: a SuperLink and SuperNodes on 127.0.0.1, with TLS
and node authentication, and intruders that must be refused.

`simulations.deploy.up` starts `flower-superlink` (TLS with a certificate of a fresh operator CA,
`--enable-supernode-auth`), registers one key per device (`flwr supernode register`) and starts one
`flower-supernode` per device (each with `--node-config "device-class='sensor' partition-id=N
tier='low'"`, as a real node would say who it is); `run` runs the app with `flwr run`; `down` stops
every process by PID. A round here is secure aggregation's exchanges (with certified device keys,
issued by `up` from the deployment's CA), each a ClientApp process per node (forked by the
node's warm executor), so the scenario is three watches and one round.

While the run goes, three intruders try to join, each as a watch:
- a node whose key was never registered, and a node with no key at all;
- a node with a registered key that trusts another CA (so it cannot verify the SuperLink: a
  man-in-the-middle's certificate would look the same to it);
- a node speaking plain HTTP to the TLS port.
Each is refused (its log says why; it never gets a node id), and the run completes with exactly
the three legitimate watches.

While it runs, the processes it started (found as descendants of this test, or by a marker in
their environment) are sampled with their sockets: every listening socket must be bound to
loopback, and every connection must go to loopback.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clients.warm_executor import ACQUIRE_TASK_METHOD
from federation.errors import FedgeError
from federation.secagg import pki
from simulations.credentials import init_certificates, node_key
from simulations.deploy import deploy_local, down, register_node, run, start_supernode, up

DEADLINE_S = 600  # the run's own; the watch below kills everything a minute later still
INTRUDER = "device-class='sensor' partition-id=0 tier='low'"  # each claims to be watch 0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, run_processes: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deploy")
    out = root / "out"
    lines: list[str] = []
    config = {
        "scenario": "deploy-check",
        "seed": 0,
        "out-dir": str(out),
        "federated-eval-every": -1,
        "device-clock": False,  # real nodes: every connected node is available
    }
    intruders: dict[str, subprocess.Popen[bytes]] = {}
    with run_processes(deadline_s=DEADLINE_S + 120) as procs:
        state = up("deploy-check", root / "deployment")
        try:
            runtime_api = f"127.0.0.1:{state.runtime_ports['sensor-0']}"
            secret = (Path(state.directory) / "superexec.secret").read_bytes()
            task_thieves = {"no secret": _acquire_task(runtime_api, None),
                            "a wrong secret": _acquire_task(runtime_api, b"guessed"),
                            "the secret": _acquire_task(runtime_api, secret)}  # fmt: skip
            (root / "guessed.secret").write_bytes(b"guessed")
            impostor = subprocess.run(
                [sys.executable, "-m", "clients.warm_executor", "--runtime-api-address", runtime_api,
                 "--insecure", "--superexec-auth-secret-file", str(root / "guessed.secret")],
                capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])  # fmt: skip
            other_ca = init_certificates(root / "other-ca")
            node_key(root / "unregistered")
            node_key(root / "registered")
            register_node(state, root / "registered.pub")
            intruders = {
                "unregistered": start_supernode(state, "unregistered", INTRUDER, key=root / "unregistered"),
                "other-ca": start_supernode(
                    state, "other-ca", INTRUDER, key=root / "registered", root_certificates=other_ca.ca_cert
                ),
                "plaintext": start_supernode(state, "plaintext", INTRUDER, insecure=True),
                "keyless": start_supernode(state, "keyless", INTRUDER, keyless=True),
            }
            code = run(state, config, on_line=lines.append, timeout_s=DEADLINE_S)
            exits = {name: proc.poll() for name, proc in intruders.items()}
            logs = {name: (state.logs / f"supernode-{name}.log").read_text() for name in intruders}
            legit_logs = [(state.logs / f"supernode-sensor-{i}.log").read_text() for i in range(3)]
            executor_logs = [(state.logs / f"executor-sensor-{i}.log").read_text() for i in range(3)]
        finally:
            down(state)
        for proc in intruders.values():
            proc.wait(timeout=30)
    assert not procs.timed_out, "the deployment hung past its deadline"
    assert code == 0, "\n".join(lines[-30:])
    return {"out": out, "procs": procs, "exits": exits, "logs": logs, "legit_logs": legit_logs,
            "lines": lines, "root": root / "deployment", "executor_logs": executor_logs,
            "task_thieves": task_thieves, "impostor": impostor}  # fmt: skip


def _acquire_task(runtime_api: str, secret: bytes | None) -> str:
    """Ask a SuperNode's Runtime API for a task as a SuperExec would (Flower's own client), with
    `secret` or none; one try. "no task" or the HTTP error it got."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({ACQUIRE_TASK_METHOD})
            )
        )
    once = RetryInvoker(
        wait_gen_factory=exponential,
        recoverable_exceptions=(httpx.HTTPStatusError,),
        max_tries=1,
        max_time=None,
        should_giveup=lambda _exc: True,
    )
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=once,
    )
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return "a task" if res.HasField("task") else "no task"
    except httpx.HTTPStatusError as exc:
        return f"HTTP {exc.response.status_code}"
    finally:
        client.close()


def test_a_secure_round_over_tls_and_node_auth_completes_and_learns(deployment: dict[str, Any]) -> None:
    rounds = [json.loads(line) for line in (deployment["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["devices"] == {"sensor": 3}  # the three registered watches, no intruder
    assert rounds[1]["secure"] is True and rounds[1]["participants"] == {"sensor": 3}
    # seeded run: a fresh head (~0.02) against one secure round of three watches (~0.2)
    assert rounds[1]["eval"]["sensor"]["accuracy"] > rounds[0]["eval"]["sensor"]["accuracy"]
    assert all("SuperNode ID:" in log for log in deployment["legit_logs"])


def test_every_task_ran_in_a_fork_of_the_nodes_warm_executor(deployment: dict[str, Any]) -> None:
    """Each SuperNode runs `--isolation process` beside fedge's warm executor: the round's tasks
    (check-in, keys + training, mask, check, unmask) ran in forks of it, and Flower's per-message
    `flwr-clientapp` process never started."""
    for log in deployment["executor_logs"]:
        assert "imported the ClientApp runtime and model code" in log, log[-1500:]
        assert log.count("fedge warm executor: task ") >= 5, log[-1500:]
        assert "exited with" not in log, log[-1500:]
    names = deployment["procs"].names.values()
    assert any("warm_executor" in name for name in names), sorted(set(names))
    assert not any("flwr-clientapp" in name for name in names), sorted(set(names))


def test_only_the_holder_of_the_superexec_secret_may_take_a_nodes_tasks(deployment: dict[str, Any]) -> None:
    """A task carries the device's message and its context (its private state): a local process
    that asks a SuperNode's Runtime API for tasks without the deployment's SuperExec secret, or
    with a guessed one, is refused; with it, it is answered (no task was pending)."""
    impostor = deployment["impostor"]  # fedge's own executor, started with the wrong secret
    assert impostor.returncode != 0, impostor.stderr[-1500:]
    assert "refused this executor's SuperExec secret" in impostor.stderr, impostor.stderr[-1500:]
    assert deployment["task_thieves"] == {
        "no secret": "HTTP 401",
        "a wrong secret": "HTTP 401",
        "the secret": "no task",
    }


def test_every_rounds_keys_are_signed_by_certified_device_keys(deployment: dict[str, Any]) -> None:
    """`up` issued one secure-aggregation key per device from the deployment's CA (`certs/ca.key`),
    each node was told its own, and the run required them (`secagg-pki`): the round has the
    consistency check that only certified keys make, and every device's key is the CA's."""
    root = deployment["root"]
    assert any("certified device keys" in line for line in deployment["lines"]), deployment["lines"][-20:]
    rounds = [json.loads(line) for line in (deployment["out"] / "metrics.jsonl").read_text().splitlines()]
    assert "check" in rounds[1]["secagg_stage_seconds"], rounds[1]
    assert rounds[1]["rejected"] == 0 and rounds[1]["aborted"] == []
    ca_public = (root / "certs" / "ca.pub").read_bytes()
    for i in range(3):
        key = root / "devices" / f"sensor-{i}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        credential = pki.load_credential(root, f"sensor-{i}")
        certified = pki.verify_certificate(ca_public, credential.certificate)
        assert certified == (f"sensor-{i}", credential.public())


def test_an_unregistered_key_is_refused(deployment: dict[str, Any]) -> None:
    log = deployment["logs"]["unregistered"]
    assert deployment["exits"]["unregistered"] not in (None, 0), log[-1500:]
    assert "Failed to activate SuperNode" in log and "SuperNode ID:" not in log, log[-1500:]


def test_a_node_without_a_key_is_refused(deployment: dict[str, Any]) -> None:
    """Without node authentication a keyless node registers itself through the Fleet API and
    joins; with it, registration is the operator's (the CLI) alone."""
    log = deployment["logs"]["keyless"]
    assert deployment["exits"]["keyless"] not in (None, 0), log[-1500:]
    assert "must be registered via the CLI" in log and "SuperNode ID:" not in log, log[-1500:]


def test_a_node_trusting_another_ca_refuses_the_superlink(deployment: dict[str, Any]) -> None:
    log = deployment["logs"]["other-ca"]
    assert deployment["exits"]["other-ca"] not in (None, 0), log[-1500:]
    assert "CERTIFICATE_VERIFY_FAILED" in log and "SuperNode ID:" not in log, log[-1500:]


def test_a_plaintext_node_never_joins_the_tls_superlink(deployment: dict[str, Any]) -> None:
    log = deployment["logs"]["plaintext"]
    # it retries for ever (Flower's node keeps trying), but no attempt ever connects
    assert "Connection attempt failed" in log and "SuperNode ID:" not in log, log[-1500:]


def test_nothing_the_deployment_started_is_left_running(deployment: dict[str, Any]) -> None:
    procs = deployment["procs"]
    assert any("flower-superlink" in name for name in procs.names.values()), "the watch saw no SuperLink"
    assert not procs.leftovers(), procs.leftovers()


def test_every_node_listens_and_connects_on_loopback_only(deployment: dict[str, Any]) -> None:
    procs = deployment["procs"]
    listening = {s for s in procs.sockets if s.kind == "listen"}
    # the SuperLink's and every SuperNode's port were seen listening (the watch is not blind)
    assert sum("flower-supernode" in s.process for s in listening) >= 3, sorted(listening, key=str)
    assert any("flower-superlink" in s.process for s in listening), sorted(listening, key=str)
    assert not procs.non_loopback(), procs.non_loopback()


def test_a_deployment_past_its_deadline_fails_clearly_and_stops_everything(
    tmp_path: Path, run_processes: Any
) -> None:
    """A run that cannot finish in time (here: 3 s, less than starting the app takes) is stopped
    by deploy_local's watchdog, whether or not it prints, with every process it started."""
    config = {"scenario": "deploy-check", "seed": 0, "out-dir": str(tmp_path), "device-clock": False}
    started = time.monotonic()
    late = pytest.raises(FedgeError, match=r"did not finish within \d+ s")
    with run_processes(deadline_s=180) as procs, late:
        deploy_local(config, log_dir=tmp_path / "logs", timeout_s=3)
    assert time.monotonic() - started < 120
    assert not procs.timed_out
    assert any("flower-superlink" in name for name in procs.names.values()), procs.names
    assert not procs.leftovers(), procs.leftovers()
