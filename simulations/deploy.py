"""A real deployment on this machine: one SuperLink and one SuperNode per device, on 127.0.0.1.

The same ServerApp and ClientApp as in simulation, run by Flower's deployment engine
(`flower-superlink`, `flower-supernode`, `flwr run . <connection>`). Secure by default:
- TLS: the SuperLink serves HTTPS with a certificate of fedge's operator CA
  (`simulations.credentials`); every SuperNode and the `flwr` connection trust only that CA;
- node authentication: the SuperLink runs with `--enable-supernode-auth`; one key pair per device
  is registered with `flwr supernode register` before the node starts with its private key.
`insecure=True` turns both off (plain HTTP, any node may join), loudly.

Each SuperNode says which device it is with `--node-config "device-class='phone'
partition-id=0 tier='high'"` (its index within its class), exactly as a real fleet's nodes would.
Everything listens on 127.0.0.1. `up` records every PID it starts (and a token every process
they start inherits) in `<dir>/deployment.json`; `down` stops exactly those.

Secure aggregation runs with certified device keys: `up` issues each device's signing key from
the deployment's CA (`devices/<name>.key|.cert`), each SuperNode's node config names it
(`secagg-device-name`, `secagg-credentials`), and `run` sets `secagg-pki` to the CA's folder.

Cost note: Flower 1.42's SuperNode runs each message in its own ClientApp process and polls its
SuperLink every 3 s when idle. By default each SuperNode here runs `--isolation process` beside
fedge's warm executor (clients/warm_executor.py: each task in a fork of a process that imported
Flower's runtime and the model code once, sharing the node's SuperExec secret); `cold` runs
Flower's own SuperExec, a fresh `flwr-clientapp` per message (docs/deployment.md, "Where a
deployed exchange's seconds go"). Simulation keeps its actors warm.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from clients.exchange_log import LOG_VAR as EXCHANGE_LOG_VAR
from federation.errors import FedgeError
from federation.scenarios import fleet_order, get_scenario
from simulations.credentials import CertificateFiles, init_certificates, node_key, secagg_device_credential
from simulations.runner import (
    APP_DIR,
    TOKEN_VAR,
    processes_with_token,
    run_config_arg,
    simulation_env,
    stop_processes,
    stream_output,
)

CONNECTION = "fedge"  # the connection's name in the deployment's own FLWR_HOME/config.toml
STATE_FILE = "deployment.json"
SUPEREXEC_POLL_VAR = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by flower-superexec (seconds, 0.01-60)
INSECURE_WARNING = (
    "INSECURE deployment: no TLS (every update and the global model travel in plain HTTP) and no "
    "node authentication (any process that reaches the port joins the federation as a device)"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedgeError(f"flower-superlink exited with code {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FedgeError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


@dataclass(frozen=True)
class NodeSpec:
    name: str  # file name of its key: "<class>-<index>"
    node_config: str  # `--node-config` value


def node_specs(scenario_name: str) -> list[NodeSpec]:
    """One SuperNode per device of the scenario's fleet: class, index within the class, tier."""
    scenario = get_scenario(scenario_name)
    return [
        NodeSpec(
            f"{cls}-{index}",
            f"device-class='{cls}' partition-id={index} tier='{scenario.tier_of(cls, index)}'",
        )
        for cls, index in fleet_order(scenario)
    ]


def node_configs(scenario_name: str) -> list[str]:
    """One `--node-config` per device of the scenario's fleet."""
    return [spec.node_config for spec in node_specs(scenario_name)]


@dataclass
class DeploymentState:
    """What `up` started, as written to `<directory>/deployment.json`."""

    directory: str
    scenario: str
    port: int
    insecure: bool
    token: str  # every process of the deployment carries it in its environment
    pids: dict[str, int] = field(default_factory=dict)  # process name -> PID
    nodes: list[dict[str, str]] = field(default_factory=list)
    exchange_log: str = ""  # a file every ClientApp process appends its exchange's timing to (or "")
    # each SuperNode runs its ClientApp tasks through fedge's warm executor (`--isolation
    # process` + clients/warm_executor.py) rather than a fresh `flwr-clientapp` per message
    warm: bool = True
    runtime_ports: dict[str, int] = field(default_factory=dict)  # node name -> its Runtime API port

    @property
    def path(self) -> Path:
        return Path(self.directory) / STATE_FILE

    @property
    def certs(self) -> CertificateFiles:
        return CertificateFiles(Path(self.directory) / "certs")

    @property
    def keys(self) -> Path:
        return Path(self.directory) / "keys"

    @property
    def secagg_credentials(self) -> Path:
        """Where the devices' certified secure-aggregation keys are: `devices/<name>.key|.cert`."""
        return Path(self.directory)

    def node_config(self, spec: NodeSpec) -> str:
        """A SuperNode's `--node-config`: the device (class, index, tier) and, when secure, where
        its certified secure-aggregation key is."""
        if self.insecure:
            return spec.node_config
        return (
            f"{spec.node_config} secagg-device-name='{spec.name}' "
            f"secagg-credentials='{self.secagg_credentials}'"
        )

    def run_config(self, run_config: Mapping[str, object]) -> dict[str, object]:
        """The run config a run on this deployment gets: when secure, `secagg-pki` names the
        operator CA's folder (its `ca.pub`), so every round's keys must be signed by certified
        device keys (an explicit `secagg-pki` wins)."""
        config = dict(run_config)
        if not self.insecure:
            config.setdefault("secagg-pki", str(self.certs.directory))
        return config

    @property
    def logs(self) -> Path:
        return Path(self.directory) / "logs"

    def save(self) -> None:
        self.path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> DeploymentState:
        path = Path(directory).resolve() / STATE_FILE
        if not path.is_file():
            raise FedgeError(f"no deployment in {path.parent} (no {STATE_FILE}): run `fedge deploy up` first")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise FedgeError(f"{path} is damaged ({exc}): stop its processes by hand") from None

    def env(self) -> dict[str, str]:
        env = simulation_env(Path(self.directory), self.token)
        # How often each node's SuperExec asks its SuperNode for a message to run (Flower's
        # default 1 s): a fifth of that takes ~0.4 s off the mean wait of every exchange.
        env.setdefault(SUPEREXEC_POLL_VAR, "0.2")
        if self.exchange_log:
            env[EXCHANGE_LOG_VAR] = self.exchange_log
        return env


def write_connection(state: DeploymentState) -> Path:
    """The deployment's `flwr` connection, in its own FLWR_HOME (never the user's ~/.flwr)."""
    flwr_home = Path(state.env()["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = "insecure = true\n" if state.insecure else f'root-certificates = "{state.certs.ca_cert}"\n'
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{state.port}"\n' + security
    )
    return path


def _popen(state: DeploymentState, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    state.logs.mkdir(parents=True, exist_ok=True)
    with (state.logs / f"{name}.log").open("ab") as out:
        return subprocess.Popen(
            args,
            env=state.env(),
            cwd=str(APP_DIR),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def superexec_secret(state: DeploymentState) -> Path:
    """`<directory>/superexec.secret`: 32 random bytes (mode 0600) a node's SuperNode and its warm
    executor share, made once per deployment folder."""
    path = Path(state.directory) / "superexec.secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    return path


def start_supernode(
    state: DeploymentState,
    name: str,
    node_config: str,
    key: Path | None = None,
    root_certificates: Path | None = None,
    insecure: bool | None = None,
    keyless: bool = False,
) -> subprocess.Popen[bytes]:
    """A SuperNode for this deployment (its PID recorded): by default with the deployment's own
    security (its CA, `keys/<name>`); tests pass other keys, CAs, `keyless` or `insecure` to play
    intruders."""
    plain = state.insecure if insecure is None else insecure
    runtime_port = free_port()  # the SuperNode's Runtime API, where its ClientApp tasks are fetched
    args = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{state.port}",
            "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", node_config]  # fmt: skip
    if plain:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(root_certificates or state.certs.ca_cert)]
        if not keyless:
            args += ["--auth-supernode-private-key", str(key or state.keys / name)]
    if state.warm:
        # Only a holder of the deployment's SuperExec secret may take this node's tasks (each
        # carries the device's message and context) from its Runtime API.
        args += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret(state))]
    proc = _popen(state, f"supernode-{name}", args)
    state.pids[f"supernode-{name}"] = proc.pid
    state.runtime_ports[name] = runtime_port
    state.save()
    if state.warm:
        # The SuperNode serves its Runtime API on loopback; the executor asks it for tasks and
        # dies with it (--parent-pid). Its own process group, so `down` stops it and its tasks.
        executor = _popen(state, f"executor-{name}", [
            sys.executable, "-m", "clients.warm_executor", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(proc.pid),
            "--superexec-auth-secret-file", str(superexec_secret(state))])  # fmt: skip
        state.pids[f"executor-{name}"] = executor.pid
        state.save()
    return proc


def register_node(state: DeploymentState, public_key: Path) -> str:
    """`flwr supernode register KEY.pub fedge`: the SuperLink admits this key from now on."""
    done = subprocess.run(
        [_bin("flwr"), "supernode", "register", str(public_key), CONNECTION],
        env=state.env(), cwd=str(APP_DIR), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode != 0 or "registered" not in done.stdout:
        raise FedgeError(
            f"flwr supernode register {public_key.name} failed: {(done.stdout + done.stderr).strip()[-400:]}"
        )
    return done.stdout.strip()


def up(
    scenario: str,
    directory: str | Path,
    insecure: bool = False,
    on_line: Callable[[str], None] | None = None,
    exchange_log: str | Path | None = None,
    cold: bool = False,
) -> DeploymentState:
    """Start a SuperLink and one SuperNode per device of `scenario`; leave them running. Each
    SuperNode runs its tasks through fedge's warm executor (clients/warm_executor.py), or with
    `cold` through Flower's own SuperExec (a fresh `flwr-clientapp` process per message).

    Credentials in `<directory>/certs` and `<directory>/keys` are made if missing and reused
    otherwise (never overwritten). A failure stops whatever this call had started."""
    say = on_line or (lambda _line: None)
    root = Path(directory).resolve()
    if (root / STATE_FILE).exists():
        old = DeploymentState.load(root)
        if status(old)["alive"]:
            raise FedgeError(f"a deployment is already up in {root}: `fedge deploy down --dir {root}` first")
    specs = node_specs(scenario)
    root.mkdir(parents=True, exist_ok=True)
    state = DeploymentState(str(root), scenario, free_port(), insecure, secrets.token_hex(8), warm=not cold)
    if exchange_log:
        state.exchange_log = str(Path(exchange_log).resolve())
    state.nodes = [asdict(s) for s in specs]
    if insecure:
        say(f"WARNING: {INSECURE_WARNING}")
    else:
        if not state.certs.ca_cert.exists():
            init_certificates(state.certs.directory)
            say(f"made a CA and a SuperLink certificate in {state.certs.directory}")
        for spec in specs:
            if not (state.keys / spec.name).exists():
                node_key(state.keys / spec.name)
            if not (state.secagg_credentials / "devices" / f"{spec.name}.key").exists():
                secagg_device_credential(state.certs.directory, state.secagg_credentials, spec.name)
    write_connection(state)
    state.save()
    try:
        security = ["--insecure"] if insecure else [
            "--ssl-ca-certfile", str(state.certs.ca_cert), "--ssl-certfile", str(state.certs.server_cert),
            "--ssl-keyfile", str(state.certs.server_key), "--enable-supernode-auth"]  # fmt: skip
        link = _popen(state, "superlink", [
            _bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(state.port),
            "--database", str(root / "state.db"), "--disable-runtime-dependency-installation"])  # fmt: skip
        state.pids["superlink"] = link.pid
        state.save()
        _wait_for_port(state.port, 60.0, link)
        say(f"SuperLink on {'http' if insecure else 'https'}://127.0.0.1:{state.port} (PID {link.pid})")
        for spec in specs:
            if not insecure:
                register_node(state, state.keys / f"{spec.name}.pub")
            proc = start_supernode(state, spec.name, state.node_config(spec))
            say(f"SuperNode {spec.name} ({spec.node_config}) PID {proc.pid}")
    except BaseException:
        down(state)
        raise
    return state


def status(state: DeploymentState) -> dict[str, list[str]]:
    """Which recorded processes are running ("alive") and which have exited ("exited")."""
    alive, exited = [], []
    for name, pid in state.pids.items():
        (alive if _ours(pid, state.token) else exited).append(f"{name} (PID {pid})")
    return {"alive": alive, "exited": exited}


def _ours(pid: int, token: str) -> bool:
    """Whether `pid` is still a live process of this deployment (not a reused PID)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TOKEN_VAR) == token
    except (psutil.Error, OSError):
        return False


def down(state: DeploymentState, grace_s: float = 10.0) -> int:
    """Stop every process `up` recorded (their process groups: each was its own session), then
    anything else carrying the deployment's token (SuperExecs, ClientApp processes). Returns
    how many processes were stopped."""
    groups = [pid for pid in state.pids.values() if _ours(pid, state.token)]
    for pid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    procs = []
    for pid in groups:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)  # gone (or reaped) before the sweep and the return
    stopped = len(groups) + stop_processes(state.token)
    state.pids = {}
    if state.path.parent.exists():
        state.save()
    return stopped


def run(
    state: DeploymentState,
    run_config: Mapping[str, object],
    on_line: Callable[[str], None] | None = None,
    log_path: Path | None = None,
    timeout_s: float = 1800.0,
) -> int:
    """`flwr run <fedge> fedge --stream` against the deployment; returns flwr's exit code."""
    cmd = [
        _bin("flwr"),
        "run",
        str(APP_DIR),
        CONNECTION,
        "--stream",
        "--run-config",
        run_config_arg(state.run_config(run_config)),
    ]
    proc = subprocess.Popen(
        cmd, env=state.env(), cwd=str(APP_DIR), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log_file = (log_path or state.logs / "flwr-run.log").open("a")
    try:

        def each_line(line: str) -> None:
            log_file.write(line)
            log_file.flush()
            if on_line:
                on_line(line.rstrip("\n"))

        stream_output(proc, each_line, timeout_s, what="the deployment's flwr run")
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()


def deploy_local(
    run_config: Mapping[str, object],
    on_line: Callable[[str], None] | None = None,
    log_dir: Path | None = None,
    timeout_s: float = 1800.0,
    insecure: bool = False,
    cold: bool = False,
) -> int:
    """`up` in a temporary folder, `run` the app on it, `down`: one command, nothing left."""
    scenario = str(run_config.get("scenario", "smart-home"))
    workdir = Path(tempfile.mkdtemp(prefix="fedge-deploy-"))
    state: DeploymentState | None = None
    started = time.monotonic()
    try:
        state = up(scenario, workdir, insecure=insecure, on_line=on_line, cold=cold)
        left = max(1.0, timeout_s - (time.monotonic() - started))
        return run(state, run_config, on_line=on_line, timeout_s=left)
    finally:
        if state is not None:
            down(state)
        if log_dir is not None and (workdir / "logs").exists():
            shutil.copytree(workdir / "logs", log_dir, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = [
    "CONNECTION",
    "INSECURE_WARNING",
    "DeploymentState",
    "NodeSpec",
    "deploy_local",
    "down",
    "node_configs",
    "node_specs",
    "processes_with_token",
    "register_node",
    "run",
    "start_supernode",
    "status",
    "up",
]
