"""Benchmarks that print figures (run on a quiet machine; quote ratios from one run)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

# The CLI's `simulate_scenario` (passed in by `fedge bench ...`: this module does not import the CLI)
Simulate = Callable[..., Path]


def overhead(seed: int, console: Console, simulate_scenario: Simulate) -> float:
    """Flower's cost over the work itself, for one round of the `bench` scenario.

    The limit: the round's local training of every device, done directly in this process, one
    device after another (warm: models built, data loaded). Flower: the same devices, data,
    steps and seed in a Flower simulation (2 Ray actors x 1 thread on 2 cores), timed from
    the server's send to the last reply aggregated, on rounds after the first (the first pays
    actor start and imports). Prints both and their ratio on the last line.
    """
    import torch

    from federation.config import RunConfig
    from federation.fleet import device_for_partition, load_device_data
    from federation.local import local_train
    from federation.model.edge import initial_state, task_slice

    run = RunConfig.parse({"scenario": "bench", "seed": seed})
    devices = [device_for_partition(run.scenario, p, seed) for p in range(run.scenario.size)]
    state = initial_state(run.scenario.tasks, run.lora, seed, run)
    data = [load_device_data(d, seed, run.seq_len) for d in devices]
    torch.set_num_threads(1)  # what one simulated device (one Ray actor) gets
    for task in run.scenario.tasks:  # warm-up: build each task model once
        i = next(i for i, d in enumerate(devices) if d.task == task)
        local_train(run, devices[i], data[i], task_slice(state, task), 0)
    start = time.perf_counter()
    for device, d in zip(devices, data, strict=True):
        local_train(run, device, d, task_slice(state, device.task), 1)
    direct_1 = time.perf_counter() - start
    console.print(f"direct, one process, 1 thread: {len(devices)} devices' local training in {direct_1:.2f}s")
    console.print(f"direct, ideal on 2 cores (half of it): {direct_1 / 2:.2f}s")

    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        sets = {"secure-aggregation": False, "device-clock": False, "federated-eval-every": -1}
        out = simulate_scenario("bench", None, seed, Path(tmp), sets, quiet=True)
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["train_wall_seconds"] for r in rounds if r["round"] >= 2]
    flower = sum(steady) / len(steady)
    first = next(r["train_wall_seconds"] for r in rounds if r["round"] == 1)
    console.print(
        f"Flower simulation (2 actors x 1 thread): round 1 {first:.2f}s, later rounds {flower:.2f}s"
    )
    ratio = flower / (direct_1 / 2)
    console.print(f"overhead ratio (Flower round / ideal direct on 2 cores): {ratio:.2f}")
    return ratio


def _alternating(out: Path) -> tuple[float, float, dict[str, float], float]:
    """Mean train-phase seconds of the plain (odd, from 3) and secure (even) rounds of one run,
    the secure rounds' stage split, and the secure/plain upload bytes per participating device
    (secure: the packed masked vector plus sealed shares; plain: the float32 contribution).
    Round 1 pays actor start and imports: left out of the times."""
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plain = [r["train_wall_seconds"] for r in rounds if r["round"] >= 3 and r["round"] % 2 == 1]
    secure = [r for r in rounds if r["round"] >= 2 and r["round"] % 2 == 0]
    stages: dict[str, float] = {}
    for r in secure:
        for stage, s in r.get("secagg_stage_seconds", {}).items():
            stages[stage] = stages.get(stage, 0.0) + s / len(secure)

    def per_device(rs: list[dict]) -> float:
        return sum(r["upload_bytes"] for r in rs) / max(1, sum(sum(r["participants"].values()) for r in rs))

    trained = [r for r in rounds if r["round"] >= 1]
    upload_ratio = per_device([r for r in trained if r["round"] % 2 == 0]) / per_device(
        [r for r in trained if r["round"] % 2 == 1]
    )
    return (
        sum(plain) / len(plain),
        sum(r["train_wall_seconds"] for r in secure) / len(secure),
        stages,
        upload_ratio,
    )


def _legacy(scenario: str, secure: bool, seed: int, size: int, tmp: Path) -> float:
    """Flower's legacy SecAgg+ workflow (or its plain DefaultWorkflow) on the same model/data."""
    from simulations.runner import APP_DIR, run_flwr

    out = tmp / f"legacy-{scenario}-{'secure' if secure else 'plain'}"
    out.mkdir(parents=True, exist_ok=True)
    config = {"scenario": scenario, "seed": seed, "num-rounds": 2, "secure": secure, "out-dir": str(out)}
    code = run_flwr(
        config, size, log_path=out / "flwr.log", app_dir=APP_DIR / "simulations" / "legacy_secagg"
    )
    rounds_file = out / "legacy_rounds.json"
    if code != 0 or not rounds_file.exists():
        raise RuntimeError(f"legacy anchor run failed (exit {code}): see {out / 'flwr.log'}")
    rounds = json.loads(rounds_file.read_text())
    steady = [r["seconds"] for r in rounds if r["round"] >= 2]
    return sum(steady) / len(steady)


def secagg(
    seed: int,
    console: Console,
    simulate_scenario: Simulate,
    sizes: tuple[int, ...] = (10, 50),
    legacy: bool = True,
) -> float:
    """Secure vs. plain rounds of the default edge model, fedge's protocol and Flower's legacy SecAgg+.

    fedge: one Flower simulation per size whose rounds alternate plain (odd) and secure (even),
    so both modes see the same machine conditions; every device of the fleet trains each round
    (the default local work: 10 MiniLM steps on a phone or TV, 30 on a watch); round 1 (actor
    start, imports) is left out; rounds 2-5 give two of each. Flower's legacy path: one run per
    mode, round 2. Prints a table, then the secure/plain upload bytes per device; the last line
    is fedge's secure/plain round-time ratio at the largest size.
    """
    from rich.table import Table

    scenarios = {10: "bench", 50: "bench-50"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-secagg-") as tmp_name:
        tmp = Path(tmp_name)
        for size in sizes:
            scenario = scenarios[size]
            sets = {"bench-alternate": True, "device-clock": False, "federated-eval-every": -1}
            out = simulate_scenario(scenario, 5, seed, tmp / scenario, sets, quiet=True)
            plain, secure, stages, upload_ratio = _alternating(out)
            console.print(f"{size} devices/round, fedge: plain {plain:.2f}s, secure {secure:.2f}s")
            console.print(
                f"{size} devices/round, fedge secure/plain upload bytes per device: {upload_ratio:.3f}"
            )
            row = {"size": size, "plain": plain, "secure": secure, "ratio": secure / plain, "stages": stages,
                   "upload_ratio": upload_ratio}  # fmt: skip
            if legacy:
                for secure in (False, True):
                    key = "legacy_secure" if secure else "legacy_plain"
                    row[key] = _legacy(scenario, secure, seed, size, tmp)
                    console.print(f"{size} devices/round, Flower legacy {key.split('_')[1]}: {row[key]:.2f}s")
                row["legacy_ratio"] = row["legacy_secure"] / row["legacy_plain"]
            rows.append(row)
    table = Table(title="secure aggregation cost per round (train phase of round 2, seconds)")
    for col in ("devices/round", "fedge plain", "fedge secure", "ratio", "upload ratio", "stages (secure)",
                "Flower plain", "Flower SecAgg+", "Flower ratio"):  # fmt: skip
        table.add_column(col)
    fmt = "{:.2f}".format
    for row in rows:
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in row["stages"].items())
        legacy_cells = (
            [fmt(row["legacy_plain"]), fmt(row["legacy_secure"]), fmt(row["legacy_ratio"]) + "x"]
            if legacy
            else ["-", "-", "-"]
        )
        table.add_row(str(row["size"]), fmt(row["plain"]), fmt(row["secure"]), fmt(row["ratio"]) + "x",
                      fmt(row["upload_ratio"]) + "x", stage_text, *legacy_cells)  # fmt: skip
    console.print(table)
    last = rows[-1]
    size_text = f"{last['size']} devices/round"
    console.print(f"fedge secure/plain upload bytes per device at {size_text}: {last['upload_ratio']:.3f}")
    console.print(f"fedge secure/plain ratio at {last['size']} devices/round: {last['ratio']:.2f}")
    return last["ratio"]


def scale(seed: int, console: Console, simulate_scenario: Simulate) -> float:
    """Peak memory of a run with 100 and with 10,000 registered devices, 100 sampled per round.

    Both are Flower simulations (one SuperNode per registered device) of the synthetic scale
    scenarios; memory is the peak of the summed RSS of every process of the run (SuperLink,
    simulation engine with the ServerApp, Ray, actors), sampled every second. The last line is
    the ratio (goal: at most 1.2).
    """

    peaks: dict[str, int] = {}
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-scale-") as tmp:
        for scenario in ("scale-100", "scale-10k"):
            peak: list[int] = []
            start = time.perf_counter()
            simulate_scenario(scenario, None, seed, Path(tmp) / scenario, {}, quiet=True, peak_rss=peak)
            times[scenario] = time.perf_counter() - start
            peaks[scenario] = peak[0]
            console.print(f"{scenario}: peak RSS {peak[0] / 2**30:.2f} GiB, {times[scenario]:.0f}s")
    ratio = peaks["scale-10k"] / peaks["scale-100"]
    console.print(f"peak RSS ratio, 10,000 vs 100 registered devices: {ratio:.2f}")
    return ratio


STAGE_EXCHANGE = {  # the server's secure-round stages and the device exchange each one is
    "keys+train": "train.secagg_keys",
    "mask": "train.secagg_mask",
    "check": "train.secagg_check",
    "unmask": "train.secagg_unmask",
}


# Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps 3 s
# (`flwr/supernode/start_client_internal.py`, not configurable) before asking again.
SUPERNODE_IDLE_POLL_S = 3.0


def flower_floor(
    exchanges: int, nodes: int, process_start_s: float, poll_s: float = SUPERNODE_IDLE_POLL_S
) -> float:
    """Seconds a deployed round cannot go below on Flower 1.42, whatever the app does.

    Each exchange waits for the last of `nodes` SuperNodes to wake from its idle sleep (each
    node's phase is uniform over `poll_s`, and the expected maximum of n uniform draws is
    poll_s * n / (n + 1)), then for one fresh ClientApp process to start (`process_start_s`: an
    interpreter importing Flower's ClientApp entry). Transport, the SuperExec's poll and the
    app's own work come on top.
    """
    if exchanges < 0 or nodes < 1 or process_start_s < 0 or poll_s < 0:
        raise ValueError("exchanges >= 0, nodes >= 1, process_start_s >= 0 and poll_s >= 0")
    return exchanges * (poll_s * nodes / (nodes + 1) + process_start_s)


def clientapp_process_start(repeats: int = 3) -> float:
    """The fastest of `repeats` fresh interpreters importing Flower's ClientApp entry point
    (what `flwr-clientapp` imports before any app code runs), in seconds."""
    import subprocess
    import sys

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flwr.supernode.cli.flwr_clientapp"], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def _steady_rounds(out: Path, first: int) -> list[dict]:
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rounds if r["round"] >= first]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stage_means(rounds: list[dict]) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for r in rounds:
        for stage, seconds in r.get("secagg_stage_seconds", {}).items():
            stages.setdefault(stage, []).append(seconds)
    return {stage: _mean(v) for stage, v in stages.items()}


def exchange_breakdown(lines: list[dict], first_round: int) -> dict[str, dict[str, float]]:
    """Mean seconds per exchange kind, over the devices' processes of rounds >= `first_round`:
    `start` (interpreter, Flower's imports, pulling the message and app), `app-import`,
    `handler`, and each named phase inside the handler (0 where a process had none)."""
    kinds: dict[str, list[dict]] = {}
    for line in lines:
        if line.get("ok") and line.get("round", first_round) >= first_round:
            kinds.setdefault(line["exchange"], []).append(line)
    out: dict[str, dict[str, float]] = {}
    for kind, calls in kinds.items():
        row = {key: _mean([c[key] for c in calls]) for key in ("start", "app-import", "handler")}
        for name in sorted({p for c in calls for p in c["phases"]}):
            row[name] = _mean([c["phases"].get(name, 0.0) for c in calls])
        row["processes"] = float(len(calls))
        row["torch-loaded"] = _mean([1.0 if "torch" in c["loaded"] else 0.0 for c in calls])
        out[kind] = row
    return out


DEPLOY_NODES = 3  # the deploy-check scenario's devices (3 watches)


def deploy(seed: int, console: Console, simulate_scenario: Simulate, rounds: int = 3) -> float:
    """Per-round time of one small scenario in a Flower simulation and in a local deployment.

    The scenario: `deploy-check` (3 watches, 10 local steps each, all of them every round),
    `rounds` rounds, secure aggregation with certified device keys (`secagg-pki`) in both, no
    on-device evaluation. The deployment (`fedge deploy up`: SuperLink with TLS and node
    authentication, 3 registered SuperNodes, each device's certified key; `fedge deploy run`)
    runs on this machine's loopback; a simulation has no network, so TLS and node
    authentication do not apply to it. Round 1 is left out of both means (the simulation's
    pays Ray's start and the actors' imports). Prints both per-round times, the secure
    stages of each (server's view), the deployment's per-exchange breakdown (from each
    ClientApp process's own log, `FEDGE_EXCHANGE_LOG`), the load average, and last the ratio
    deployment / simulation.
    """
    import os

    from rich.table import Table

    from federation.secagg.pki import create_fleet_pki, device_name_for
    from simulations.deploy import down, run, up

    scenario = "deploy-check"
    sets: dict[str, object] = {"device-clock": False, "federated-eval-every": -1, "secure-aggregation": True}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-deploy-") as tmp_name:
        tmp = Path(tmp_name)
        pki_dir = create_fleet_pki(tmp / "pki", [device_name_for(p) for p in range(DEPLOY_NODES)])
        load_before = os.getloadavg()[0]
        sim_out = simulate_scenario(
            scenario, rounds, seed, tmp / "simulation", {**sets, "secagg-pki": str(pki_dir)}, quiet=True
        )
        sim = _steady_rounds(sim_out, 2)
        deployed = {}
        for kind in ("warm", "cold"):  # fedge's warm executor, then Flower's own SuperExec
            exchanges = tmp / f"exchanges-{kind}.jsonl"
            state = up(scenario, tmp / f"deployment-{kind}", exchange_log=exchanges, cold=kind == "cold")
            config = {
                "scenario": scenario,
                "seed": seed,
                "num-rounds": rounds,
                "out-dir": str(tmp / kind),
                **sets,
            }
            try:
                code = run(state, config, timeout_s=600.0 + 300.0 * rounds)
            finally:
                down(state)
            if code != 0:
                raise RuntimeError(f"the {kind} deployment's run failed (exit {code}): see {state.logs}")
            lines = [json.loads(line) for line in exchanges.read_text().splitlines() if line.strip()]
            deployed[kind] = (_steady_rounds(tmp / kind, 2), lines)
        load_after = os.getloadavg()[0]
    (dep, lines), (cold, _) = deployed["warm"], deployed["cold"]
    if not sim or not dep or not cold:
        raise RuntimeError("no steady rounds (run at least 2 rounds)")
    sim_round = _mean([r["wall_seconds"] for r in sim])
    dep_round = _mean([r["wall_seconds"] for r in dep])
    sim_stages, dep_stages = _stage_means(sim), _stage_means(dep)
    breakdown = exchange_breakdown(lines, 2)

    stages = Table(title=f"secure round stages, mean of rounds 2-{rounds} (seconds, server's view)")
    for col in ("stage", "simulation", "deployment", "deployment: process start", "handler",
                "the rest: polling, queueing, transport"):  # fmt: skip
        stages.add_column(col)
    for stage in dep_stages:
        row = breakdown.get(STAGE_EXCHANGE.get(stage, ""), {})
        process = row.get("start", 0.0) + row.get("app-import", 0.0) + row.get("handler", 0.0)
        rest = dep_stages[stage] - process if row else float("nan")
        stages.add_row(stage, f"{sim_stages.get(stage, float('nan')):.2f}", f"{dep_stages[stage]:.2f}",
                       f"{row.get('start', float('nan')):.2f}", f"{row.get('handler', float('nan')):.2f}",
                       f"{rest:.2f}")  # fmt: skip
    console.print(stages)
    per_exchange = Table(title="deployment: where one exchange's seconds go (mean per ClientApp process)")
    per_exchange.add_column("exchange")
    per_exchange.add_column("processes")
    per_exchange.add_column("process start")
    per_exchange.add_column("handler")
    per_exchange.add_column("inside the handler")
    per_exchange.add_column("imported torch")
    fixed = {"start", "app-import", "handler", "processes", "torch-loaded"}
    for kind, row in sorted(breakdown.items()):
        inside = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k not in fixed)
        started = row["start"] + row["app-import"]
        per_exchange.add_row(kind, f"{row['processes']:.0f}", f"{started:.2f}", f"{row['handler']:.2f}",
                             inside or "-", f"{row['torch-loaded']:.0%}")  # fmt: skip
    console.print(per_exchange)
    console.print(
        f"load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores"
    )
    cold_round = _mean([r["wall_seconds"] for r in cold])
    console.print(
        f"simulation: {sim_round:.2f}s per round; deployment (TLS, node auth, fedge's warm executor): "
        f"{dep_round:.2f}s per round; the same deployment on Flower's own SuperExec (a fresh "
        f"flwr-clientapp per message): {cold_round:.2f}s per round, "
        f"{cold_round / dep_round:.2f}x the warm one's"
    )
    exchanges_per_round = sum(stage in STAGE_EXCHANGE for stage in dep_stages)
    start_s = clientapp_process_start()
    floor = flower_floor(exchanges_per_round, DEPLOY_NODES, 0.0)
    console.print(
        f"Flower 1.42's floor for this round (per exchange, the last of {DEPLOY_NODES} SuperNodes' "
        f"{SUPERNODE_IDLE_POLL_S:.0f} s idle polls, expected {flower_floor(1, DEPLOY_NODES, 0.0):.2f}s): "
        f"{floor:.2f}s, {floor / sim_round:.1f}x the simulation's round; with a fresh ClientApp process "
        f"per exchange ({start_s:.2f}s here) "
        f"{flower_floor(exchanges_per_round, DEPLOY_NODES, start_s):.2f}s; above the floor, fedge's and "
        f"the transport's share: {dep_round - floor:.2f}s"
    )
    ratio = dep_round / sim_round
    console.print(f"deployment/simulation per-round time ratio: {ratio:.2f}")
    return ratio
