"""Run a scenario through Flower's own simulation engine (`flwr run`), safely, and clean up.

What this adds around `flwr run . --stream` (docs/architecture.md, "Flower 1.42 facts"):
- a private FLWR_HOME (temp dir) and a private HOME holding `ray_bootstrap_config.yaml`, so that
  Ray's dashboard does not probe cloud metadata; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps
  every Ray socket on 127.0.0.1; telemetry, update checks and runtime `uv sync` off;
- every process the run starts (the detached local SuperLink, SuperExec, flwr-simulation, Ray)
  carries a token in its environment, and is stopped by PID when the run ends or fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

APP_DIR = Path(__file__).resolve().parent.parent  # the folder holding pyproject.toml
TOKEN_VAR = "FEDGE_SIM_TOKEN"
SUPERLINK_SLOW_START = "Failed to start local SuperLink within"  # flwr run's message (Flower 1.42)
SUPERLINK_RETRY_NOTE = (
    "Flower's local SuperLink did not start within its fixed 15 s (a busy machine?): retrying once"
)


def toml_value(value: object) -> str:
    """A run-config value as a TOML value that Flower's `-c` parser reads back unchanged.

    Flower splits `--run-config` at spaces outside quotes and does not honour escaped quotes,
    so a string is written as a literal '...' (no escapes at all) or, if it holds a `'`, as a
    basic "..." string; one holding both quote kinds (or a newline) cannot travel.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "\n" in text or "\r" in text or ("'" in text and '"' in text):
        from federation.errors import FedgeError

        raise FedgeError(f"run-config value {text!r}: Flower cannot carry a newline or both quote kinds")
    if "'" not in text:
        return f"'{text}'"
    return '"' + text.replace("\\", "\\\\") + '"'


def run_config_arg(config: Mapping[str, object]) -> str:
    """`flwr run --run-config` syntax: space-separated key=TOML-value pairs."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def simulation_env(workdir: Path, token: str) -> dict[str, str]:
    """The environment for `flwr run` and everything it starts."""
    from federation.data.common import cache_dir

    env = dict(os.environ)
    real_cache = str(cache_dir())  # resolve before HOME changes
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    env.update(
        {
            "FLWR_HOME": str(workdir / "flwr"),
            "HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # CPU only: silences Ray's future-change notice
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FEDGE_CACHE": real_cache,
            # A private local SuperLink on free ports: concurrent runs never share (or stop) one.
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
            TOKEN_VAR: token,
        }
    )
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_with_token(token: str) -> list[psutil.Process]:
    """Every live process whose environment carries this run's token (not ourselves)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    # Ray starts its dashboard and runtime-env agents with an environment of its own (no token)
    # and they ignore SIGTERM: find them as descendants before their parents go.
    seen = {p.pid: p for p in procs}
    for proc in procs:
        try:
            for child in proc.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return list(seen.values())


def stop_processes(token: str, grace_s: float = 5.0) -> int:
    """SIGTERM then SIGKILL every process of the run; returns how many were stopped."""
    procs = _with_descendants(processes_with_token(token))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    # Ray workers can be (re)spawned while we stop their parents: sweep once more.
    late = processes_with_token(token)
    for proc in late:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    # and wait for them: a process killed with torch loaded takes a moment to release its memory,
    # and whoever called this expects it gone on return
    psutil.wait_procs(late, timeout=grace_s)
    return len(procs) + len(late)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stream_output(
    proc: subprocess.Popen[str],
    on_line: Callable[[str], None],
    timeout_s: float | None,
    what: str = "flwr run",
) -> None:
    """Pass each line of `proc`'s stdout to `on_line` until it closes; after `timeout_s` seconds
    kill `proc` and raise a FedgeError.

    A watchdog thread enforces the deadline, so a process that hangs *silently* is stopped too
    (a check between lines would wait forever for the next line).
    """
    from federation.errors import FedgeError

    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    watchdog = threading.Timer(timeout_s, expire) if timeout_s else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line)
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if expired.is_set():
        raise FedgeError(
            f"{what} did not finish within {timeout_s:.0f} s: stopped it and every process it started"
        )


def _sample_rss(token: str, peak: list[int], done: threading.Event, every_s: float = 1.0) -> None:
    """Track the peak of the summed resident memory of every process of the run."""
    while not done.wait(every_s):
        total = 0
        for proc in processes_with_token(token):
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak[0] = max(peak[0], total)


def run_flwr(
    run_config: Mapping[str, object],
    num_supernodes: int,
    on_line: Callable[[str], None] | None = None,
    log_path: Path | None = None,
    cpus_per_client: int = 1,
    timeout_s: float | None = None,
    app_dir: Path = APP_DIR,
    peak_rss: list[int] | None = None,
) -> int:
    """`flwr run <fedge> local --stream` with a private environment; returns its exit code."""
    token = secrets.token_hex(8)
    workdir = Path(tempfile.mkdtemp(prefix="fedge-sim-"))
    env = simulation_env(workdir, token)
    flwr = shutil.which("flwr", path=env["PATH"]) or "flwr"
    cmd = [
        flwr, "run", str(app_dir), "local", "--stream",
        "--run-config", run_config_arg(run_config),
        "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
    ]  # fmt: skip
    log_file = log_path.open("w") if log_path else None
    proc: subprocess.Popen[str] | None = None
    done = threading.Event()
    sampler = None
    if peak_rss is not None:
        peak_rss[:] = [0]
        sampler = threading.Thread(target=_sample_rss, args=(token, peak_rss, done), daemon=True)
        sampler.start()
    previous_handler = None
    try:
        # `kill PID` of fedge itself must still stop the run's processes (the finally below)
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _raise_exit)
        slow_start = False

        def each_line(line: str) -> None:
            nonlocal slow_start
            slow_start = slow_start or SUPERLINK_SLOW_START in line
            if log_file:
                log_file.write(line)
                log_file.flush()
            if on_line:
                on_line(line.rstrip("\n"))

        started = time.monotonic()
        for attempt in (1, 2):
            left = timeout_s  # the retry gets what is left of it
            if timeout_s is not None and attempt == 2:
                left = max(1.0, timeout_s - (time.monotonic() - started))
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=str(app_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            stream_output(proc, each_line, left)
            code = proc.wait(timeout=60)  # stdout closed: flwr run is exiting
            if code == 0 or not slow_start or attempt == 2:
                return code
            # Flower gives its local SuperLink a fixed 15 s to start (flwr/cli/local_superlink.py);
            # on a loaded machine that can pass before it listens. Nothing ran yet: retry once.
            stop_processes(token)
            slow_start = False
            each_line(f"fedge: {SUPERLINK_RETRY_NOTE}\n")
        return code
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        done.set()
        if sampler is not None:
            sampler.join(timeout=5)
        if proc and proc.poll() is None:
            proc.kill()
        stop_processes(token)
        if log_file:
            log_file.close()
        shutil.rmtree(workdir, ignore_errors=True)
