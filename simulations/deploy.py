"""A real deployment on this machine: one SuperLink and one SuperNode per device, on 127.0.0.1.

The same ServerApp and ClientApp as in simulation, run by Flower's deployment engine
(`flower-superlink`, `flower-supernode`, `flwr run . <connection>`). Each SuperNode says which
device it is with `--node-config "device-class='phone' partition-id=0"` (its index within its
class), exactly as a real fleet's nodes would. Everything listens on 127.0.0.1 and every process
is stopped by PID at the end.

Cost note: with Flower's default `--isolation subprocess`, a SuperNode starts a fresh
`flwr-clientapp` process per message, which re-imports torch/peft (~10-20 s here), so a
deployment round costs that per exchange; simulation keeps its actors warm.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from federation.errors import FedgeError
from federation.scenarios import fleet_order, get_scenario
from simulations.runner import APP_DIR, run_config_arg, simulation_env, stop_processes, stream_output


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


def node_configs(scenario_name: str) -> list[str]:
    """One `--node-config` per device of the scenario's fleet: class + index within the class."""
    scenario = get_scenario(scenario_name)
    return [f"device-class='{cls}' partition-id={index}" for cls, index in fleet_order(scenario)]


def deploy_local(
    run_config: Mapping[str, object],
    on_line: Callable[[str], None] | None = None,
    log_dir: Path | None = None,
    timeout_s: float = 1800.0,
) -> int:
    """Start SuperLink + SuperNodes on loopback, `flwr run` the app on them, stop everything."""
    scenario = str(run_config.get("scenario", "smart-home"))
    token = secrets.token_hex(8)
    workdir = Path(tempfile.mkdtemp(prefix="fedge-deploy-"))
    env = simulation_env(workdir, token)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    flwr_home = Path(env["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        'default = "fedge-deploy"\n\n'
        "[superlink.fedge-deploy]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    logs = log_dir or workdir
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    files = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        files.append(out)
        proc = subprocess.Popen(
            args, env=env, cwd=str(APP_DIR), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        return proc

    try:
        link = start(
            "superlink",
            [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--database", str(workdir / "state.db"), "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        _wait_for_port(port, 60.0, link)
        for i, config in enumerate(node_configs(scenario)):
            start(
                f"supernode-{i}",
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config],
            )  # fmt: skip
        cmd = [str(bin_dir / "flwr"), "run", str(APP_DIR), "fedge-deploy", "--stream",
               "--run-config", run_config_arg(run_config)]  # fmt: skip
        run = subprocess.Popen(
            cmd, env=env, cwd=str(APP_DIR), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append(run)  # type: ignore[arg-type]
        with (logs / "flwr-run.log").open("w") as log_file:

            def each_line(line: str) -> None:
                log_file.write(line)
                if on_line:
                    on_line(line.rstrip("\n"))

            stream_output(run, each_line, timeout_s, what="the deployment's flwr run")
        return run.wait(timeout=30)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 15)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_processes(token)  # SuperExecs and ClientApp processes the nodes started
        for f in files:
            f.close()
        shutil.rmtree(workdir, ignore_errors=True)
