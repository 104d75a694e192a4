"""A warm SuperExec for one SuperNode: the ClientApp runs in a fork of a process that has
already imported Flower's ClientApp runtime and the model code (torch, transformers, peft).

Flower 1.42 runs every message a SuperNode receives in a fresh `flwr-clientapp` process, which a
SuperExec launches when the SuperNode's Runtime API hands it a task. In the default
`--isolation subprocess` the SuperNode starts `flower-superexec` itself; with
`flower-supernode --isolation process` it leaves that to the operator, who starts a SuperExec
against its Runtime API (`--runtime-api-address`). This module is such a SuperExec. It asks the
Runtime API for tasks exactly as `flower-superexec` does (`AcquireTask`), and runs each with
Flower's own `run_clientapp`, the function `flwr-clientapp` runs, but in a child forked from a
process that imported the heavy libraries once, at start:

- a fresh `flwr-clientapp` costs an interpreter start and Flower's entry imports (1.4-3 s on a
  2-core machine), plus, in the exchange that trains, torch, transformers and peft (4.5-9 s);
  a fork of the warm process costs milliseconds and shares those modules copy-on-write;
- each task still runs in its own process, as Flower's isolation intends: a ClientApp that
  crashes, leaks or hangs takes down its child only; the next task forks afresh.

The app's own code is not kept warm: the child drops every module of the app's packages
(`APP_PACKAGES`) before `run_clientapp` loads the ClientApp, so a task runs the code of the FAB
it was sent with, as `flwr-clientapp` would, and a run with a new FAB needs no restart. Only
third-party libraries (the environment, the same for every FAB) stay imported.

The parent never runs torch code, so no thread pool exists when it forks (a fork after
OpenMP work can deadlock the child). It stops with its SuperNode (`--parent-pid`) and stops its
children on SIGTERM/SIGINT.

    python -m clients.warm_executor --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid PID
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

APP_PACKAGES = ("clients", "federation", "server", "simulations")
"""Top-level packages of the app: imported fresh, from the task's FAB, in every child."""

PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",  # Flower's ClientApp runtime (its own entry imports)
    "clients.client_app",  # pulls in Flower's app API and numpy/cryptography for secure aggregation
    "federation.config",  # torch (a run config's model and training settings)
    "federation.local",
    "federation.fleet",
    # what the model code imports inside its functions (federation/model): peft's LoRA and
    # transformers' BERT (MiniLM) and tokenizers, which pull in scipy, sympy and accelerate
    "peft",
    "peft.tuners.lora",
    "peft.optimizers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.auto.tokenization_auto",
)
"""What the warm process imports before it serves: the modules a training exchange imports.
The app's own modules among them are dropped again (`drop_app_modules`); the third-party
modules they imported stay."""

ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
"""The Runtime API call a SuperExec secret protects (as Flower's own SuperExec declares it)."""

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # the variable `flower-superexec` reads
DEFAULT_POLL_S = 0.05


def drop_app_modules(modules: dict[str, object], packages: Iterable[str] = APP_PACKAGES) -> list[str]:
    """Remove the app's modules (`packages` and their submodules) from `modules` (sys.modules);
    returns their names. The next import of one reads it anew from `sys.path`."""
    tops = set(packages)
    names = [name for name in modules if name.split(".", 1)[0] in tops]
    for name in names:
        del modules[name]
    return names


def preload(names: Sequence[str] = PRELOAD) -> tuple[float, dict[str, str]]:
    """Import `names`, then drop the app's own modules again; returns the seconds it took and
    the modules that failed to import, with why. A failure costs speed, not service: the task
    that needs the module imports it itself (and reports the error, if it still fails there)."""
    started = time.perf_counter()
    failed: dict[str, str] = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import-time error of a library
            failed[name] = f"{type(exc).__name__}: {exc}"
    drop_app_modules(sys.modules)
    return time.perf_counter() - started, failed


def poll_interval(environ: dict[str, str] | os._Environ[str]) -> float:
    """Seconds between `AcquireTask` calls: `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (0.01-60), else
    `DEFAULT_POLL_S`: an idle SuperExec asking its local SuperNode 20 times a second costs
    nothing measurable, and each exchange waits half the interval on average."""
    raw = environ.get(POLL_ENV)
    if raw is None:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{POLL_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0.01 <= value <= 60.0:
        raise ValueError(f"{POLL_ENV} must lie in [0.01, 60] seconds, got {raw!r}")
    return value


@dataclass
class Children:
    """The forked task processes still running, reaped without blocking."""

    pids: set[int] = field(default_factory=set)

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit status) of every child that has ended since the last call."""
        ended = []
        for pid in list(self.pids):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
                ended.append((pid, os.waitstatus_to_exitcode(status)))
            self.pids.discard(pid)
        return ended

    def stop(self, grace_s: float = 5.0) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.pids and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reap()


def run_task_in_child(task: Callable[[], None]) -> int:
    """Fork; the child runs `task` and exits with its status without running the parent's exit
    handlers (Flower's `run_clientapp` ends in `sys.exit`). Returns the child's PID."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        drop_app_modules(sys.modules)
        task()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the child must never return into the parent's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(
    runtime_api_address: str,
    insecure: bool,
    root_certificates_path: str | None = None,
    superexec_auth_secret: bytes | None = None,
    parent_pid: int | None = None,
    poll_s: float = DEFAULT_POLL_S,
) -> None:
    """Serve the SuperNode at `runtime_api_address` until stopped: each ClientApp task runs in
    a fork of this (warm) process."""
    from logging import INFO, WARNING

    import httpx
    from flwr.supercore import log

    took, failed = preload(PRELOAD)
    log(INFO, "fedge warm executor: imported the ClientApp runtime and model code in %.2f s", took)
    for name, why in failed.items():
        log(WARNING, "fedge warm executor: could not preload %s (%s): each task imports it itself", name, why)

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    certificates = validate_and_resolve_root_certificates(root_certificates_path, insecure)
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if superexec_auth_secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=superexec_auth_secret,
                protected_methods=frozenset({ACQUIRE_TASK_METHOD}),
            )
        )
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    children = Children()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        # raised in the main thread wherever it is: also inside a call to the Runtime API that
        # is retrying because the SuperNode has gone (a flag checked between calls never would be)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=_retry_invoker(),
    )
    try:
        while True:
            for pid, code in children.reap():
                if code != 0:
                    log(WARNING, "fedge warm executor: task process %d exited with %d", pid, code)
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPStatusError as exc:
                code = exc.response.status_code
                why = (
                    "refused this executor's SuperExec secret: give the SuperNode and the executor the "
                    "same --superexec-auth-secret-file"
                    if code == httpx.codes.UNAUTHORIZED
                    else f"answered HTTP {code}"
                )
                raise SystemExit(
                    f"fedge warm executor: the SuperNode at {runtime_api_address} {why}"
                ) from None
            if res.HasField("task") and res.token:
                token = res.token

                def task(token: str = token) -> None:
                    # a fresh HTTP client in the child: none of the parent's connections are shared
                    run_clientapp(
                        runtime_api_address=runtime_api_address,
                        token=token,
                        insecure=insecure,
                        certificates=certificates,
                        parent_pid=os.getppid(),
                    )

                pid = run_task_in_child(task)
                children.pids.add(pid)
                log(
                    INFO,
                    "fedge warm executor: task %d of run %d in process %d",
                    res.task.task_id,
                    res.task.run_id,
                    pid,
                )
                continue  # another task may be waiting: ask again at once
            time.sleep(poll_s)
    finally:
        children.stop()
        client.close()


def _retry_invoker() -> Any:
    """Flower's retry policy for a Runtime API client, except that an HTTP status other than a
    gateway's (502-504: the node restarting) is raised at once: Flower's own simple invoker
    answers a 401 by interrupting its process, which here would hide why."""
    import httpx
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    transient = {httpx.codes.BAD_GATEWAY, httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT}
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=None,
        should_giveup=lambda exc: (
            isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in transient
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clients.warm_executor",
        description="A warm SuperExec for a `flower-supernode --isolation process`: each ClientApp "
        "task runs in a fork of a process that imported Flower's runtime and the model code once.",
    )
    parser.add_argument(
        "--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)"
    )
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback)")
    security.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS")
    parser.add_argument("--superexec-auth-secret-file", help="the SuperNode's --superexec-auth-secret-file")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    args = parser.parse_args(argv)
    try:
        poll_s = poll_interval(os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    try:  # Flower's own reader: the file's exact bytes, as the SuperNode reads them
        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    except ValueError as exc:
        parser.error(f"--superexec-auth-secret-file: {exc}")
    serve(args.runtime_api_address, args.insecure, args.root_certificates, secret, args.parent_pid, poll_s)


if __name__ == "__main__":
    main()
