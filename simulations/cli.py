"""`fedge`: run scenarios, benchmarks and maintenance tasks from the command line."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from federation.defaults import run_default  # the one place run defaults are written: pyproject
from federation.errors import FedgeError

if TYPE_CHECKING:
    from federation.config import RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="fedge: cross-device federated LoRA on Flower",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures (never timed tests).")
app.add_typer(bench_app, name="bench")
# Wide enough for the benchmark tables when output goes to a file or a pipe (rich's default: 80).
console = Console(width=None if sys.stdout.isatty() else 160)


SET_HELP = (
    "override a run-config key: KEY=VALUE, VALUE read as `flwr run -c` reads it "
    "(true/false, 4, 0.3, 'text'; a bare word is a string)"
)


def _parse_sets(sets: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` items, each VALUE read as `flwr run -c` reads it (simulations.overrides)."""
    from simulations.overrides import parse_overrides

    return dict(parse_overrides(sets))


def print_summary(summary: dict) -> None:
    table = Table(title=f"fedge {summary['scenario']}: held-out results after {summary['rounds']} rounds")
    for col in ("task", "metric", "initial", "final", "best baseline"):
        table.add_column(col)
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)


def summary_rows(summary: dict) -> list[tuple[str, ...]]:
    """(task, metric, initial, final, best baseline) rows; a personalised task (TV) gets one for
    the shared part alone (server-side, cold start) and one with each device's private part (on
    devices), the baselines that know each device's data (`device_baselines`) going to the latter."""
    rows = []
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for task, t in summary["tasks"].items():
        metric = t["metric"]
        baselines = {n: v[metric] for n, v in t.get("baselines", {}).items() if v.get(metric) is not None}
        personal = bool(t.get("personalised")) and t.get("on_devices", {}).get("initial") is not None
        device_baselines = t.get("device_baselines", [])
        shared = {n: v for n, v in baselines.items() if not (personal and n in device_baselines)}
        label = f"{task} (shared part, cold start)" if personal else task
        best = max(shared.items(), key=lambda b: b[1]) if shared else None
        rows.append(
            (label, metric, fmt(t["initial"]), fmt(t["final"]), f"{best[0]} {best[1]:.4f}" if best else "-")
        )
        if personal:
            viewer = {n: baselines[n] for n in device_baselines if n in baselines}
            best = max(viewer.items(), key=lambda b: b[1]) if viewer else None
            on = t["on_devices"]
            rows.append(
                (f"{task} (personalised, on devices)", metric, fmt(on["initial"]), fmt(on["final"]),
                 f"{best[0]} {best[1]:.4f}" if best else "-")
            )  # fmt: skip
    return rows


def scenario_argument(scenario: str) -> str:
    """A scenario name as given, or a scenario file's absolute path: every process of the run
    (started elsewhere, by Flower) must find the file."""
    return str(Path(scenario).resolve()) if scenario.endswith(".toml") else scenario


def default_out(scenario: str, out: Path | None, sets: dict[str, object] | None = None) -> Path:
    """`--out` (or `--set out-dir=DIR`, the same setting), or results/<scenario>/<timestamp>
    under the working directory; absolute."""
    given = (sets or {}).get("out-dir")
    if given not in (None, ""):
        named = Path(str(given)).resolve()
        if out is not None and out.resolve() != named:
            raise FedgeError(f"--out {out} and --set out-dir={given} name two output folders: give one")
        out = named
    return (out or Path("results") / scenario / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


def run_config_for(
    scenario: str, rounds: int | None, seed: int, out: Path, sets: dict[str, object]
) -> tuple[dict[str, object], RunConfig]:
    """The overrides `flwr run` gets, and the whole run config the apps will see, validated.

    The overrides are fused with `[tool.flwr.app.config]` as Flower fuses them, so a bad value
    (from `--set` or from pyproject.toml) fails here, naming the flag, before anything starts.
    """
    from federation.config import ConfigSource, RunConfig
    from simulations.overrides import fused_run_config

    # the output folder last: `--set out-dir` is folded into `out` by `default_out`
    config: dict[str, object] = {"scenario": scenario, "seed": seed, **sets, "out-dir": str(out)}
    if rounds:
        config["num-rounds"] = rounds
    source = ConfigSource(flag="--set", given=frozenset(sets))
    return config, RunConfig.parse(fused_run_config(config), source)  # type: ignore[arg-type]


def simulate_scenario(
    scenario: str,
    rounds: int | None,
    seed: int,
    out: Path | None,
    sets: dict[str, object],
    quiet: bool = False,
    peak_rss: list[int] | None = None,
) -> Path:
    from federation.scenarios import get_scenario
    from server.status import FAILED, read_status
    from simulations.progress import RoundFollower, round_line, status_line
    from simulations.runner import run_flwr

    started = time.monotonic()
    scenario = scenario_argument(scenario)
    spec = get_scenario(scenario)
    out = default_out(spec.name, out, sets)
    config, run = run_config_for(scenario, rounds, seed, out, sets)  # validated before anything starts
    total = run.rounds
    if run.initial_checkpoint:
        from federation.checkpoint import load_checkpoint

        load_checkpoint(run.initial_checkpoint)  # a missing or corrupt checkpoint fails here, not in Ray
    out.mkdir(parents=True, exist_ok=True)
    # A terminal gets a live progress bar; a pipe or a file (CI, `| tee`) gets one plain line
    # per round, since a bar there would only be drawn at the end.
    plain = not quiet and not console.is_terminal
    if plain:
        rounds_text = f"{total} round{'s' if total != 1 else ''}"
        print(f"fedge: {scenario}, {rounds_text}, output {out}; starting Flower's simulation", flush=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=quiet or plain,
    ) as progress:
        bar = progress.add_task(f"{scenario}", total=total, status="starting Flower simulation")

        def on_round(entry: dict) -> None:
            line = round_line(entry, total, time.monotonic() - started)
            if plain:
                print(line, flush=True)
            else:
                progress.update(bar, completed=entry["round"], status=line.split(": ", 1)[-1][:70])

        def on_status(status: dict) -> None:
            if status["stage"] != FAILED:  # a failure is reported once, below
                progress.update(bar, status=status_line(status))

        with RoundFollower(out / "metrics.jsonl", on_round, on_status=on_status):
            code = run_flwr(config, spec.size, log_path=out / "flwr.log", peak_rss=peak_rss)
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.exists():
        status = read_status(out)
        if status is not None and status["stage"] == FAILED:
            detail = f"{status.get('error')} (log: {out / 'flwr.log'})"
        else:
            detail = f"see {out / 'flwr.log'}"
        raise FedgeError(f"simulation failed (exit {code}): {detail}")
    if not quiet:
        print_summary(json.loads(summary_path.read_text()))
        console.print(f"results in {out}")
    return out


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="named scenario (fedge scenarios)")] = run_default("scenario"),
    rounds: Annotated[int | None, typer.Option(help="rounds (default: the scenario's)")] = None,
    seed: Annotated[
        int, typer.Option(help="seed for data splits, sampling and model init")
    ] = run_default("seed"),
    out: Annotated[
        Path | None, typer.Option(help="output folder (default results/<scenario>/<timestamp>)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help=SET_HELP,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="validate and print the run config the apps would get; run nothing"),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="a run's output folder: continue it after its last completed round"),
    ] = None,
) -> None:
    """Run a scenario in Flower's simulation engine; leave metrics, summary, adapter and plots."""
    sets = _parse_sets(set_ or [])
    if resume is not None:
        scenario, saved_rounds, seed, out, sets = resume_settings(resume, sets)
        rounds = rounds or saved_rounds
    if dry_run:
        from federation.scenarios import get_scenario
        from simulations.overrides import fused_run_config
        from simulations.runner import toml_value

        scenario = scenario_argument(scenario)
        out = default_out(get_scenario(scenario).name, out, sets)
        config, _ = run_config_for(scenario, rounds, seed, out, sets)
        for key, value in fused_run_config(config).items():  # type: ignore[arg-type]
            print(f"{key} = {toml_value(value)}")
        return
    simulate_scenario(scenario, rounds, seed, out, sets)


def resume_settings(
    directory: Path, sets: dict[str, object]
) -> tuple[str, int | None, int, Path, dict[str, object]]:
    """(scenario, rounds, seed, out, sets) that continue the run in `directory` after its last
    checkpoint: the run config it was started with (the checkpoint carries it), `sets` on top,
    the same output folder, and `initial-checkpoint` pointing at its checkpoint."""
    directory = directory.resolve()
    info_path = directory / "checkpoint.json"
    if not info_path.is_file():
        raise FedgeError(f"--resume {directory}: no checkpoint.json (written after each round)")
    try:
        info = json.loads(info_path.read_text())
    except ValueError:
        raise FedgeError(f"--resume {directory}: checkpoint.json is damaged") from None
    saved = info.get("run_config")
    if not isinstance(saved, dict) or "scenario" not in saved:
        raise FedgeError(
            f"--resume {directory}: its checkpoint does not record the run config; "
            f"use --set initial-checkpoint={directory / 'checkpoint.safetensors'} with the run's settings"
        )
    fixed = ("scenario", "seed", "out-dir", "num-rounds", "initial-checkpoint")
    merged = {k: v for k, v in saved.items() if k not in fixed}
    merged.update(sets)
    merged["initial-checkpoint"] = str(directory / "checkpoint.safetensors")
    rounds = int(saved.get("num-rounds", 0)) or None
    return str(saved["scenario"]), rounds, int(saved.get("seed", 0)), directory, merged


@app.command()
def scenarios() -> None:
    """List the named scenarios (built-in, then those installed packages declare)."""
    from federation.scenarios import get_scenario, known_scenarios

    table = Table(title="scenarios")
    for col in ("name", "devices (class/tier)", "per round", "rounds", "description"):
        table.add_column(col)
    for s in map(get_scenario, known_scenarios()):
        fleet = ", ".join(f"{k} {n}" for k, n in (s.tiers or {}).items())
        table.add_row(s.name, fleet, str(s.per_round), str(s.rounds), s.description)
    console.print(table)


@app.command()
def prepare() -> None:
    """Check the model and data packages and build the data caches (tokenised, windowed)."""
    import time

    from federation.data.common import cache_dir
    from federation.model.backbones import minilm_dir, text_tokenizer
    from federation.model.imu import load_imu_encoder
    from federation.tasks import get_task, known_tasks

    start = time.perf_counter()
    minilm_dir()
    text_tokenizer()
    load_imu_encoder()
    counts = {name: get_task(name).prepare(None) for name in known_tasks()}
    console.print(f"data ready in {cache_dir()} ({time.perf_counter() - start:.1f}s): clients {counts}")


@app.command("pretrain-imu")
def pretrain_imu(seed: int = 0, epochs: int = 30) -> None:
    """Rebuild the shipped IMU encoder from the vendor-lab subjects."""
    from federation.model.imu import ENCODER_FILE, pretrain_imu_encoder

    report = pretrain_imu_encoder(seed=seed, epochs=epochs)
    console.print(f"wrote {ENCODER_FILE}: {report}")


COLD_HELP = (
    "Flower's own SuperExec: a fresh flwr-clientapp process per message (default: each SuperNode's "
    "tasks run in forks of fedge's warm executor, which imported Flower's runtime and the model code once)"
)


@app.command("deploy-local")
def deploy_local_cmd(
    scenario: Annotated[str, typer.Option(help="named scenario: one SuperNode per device")] = "smoke",
    rounds: Annotated[int | None, typer.Option(help="rounds (default: the scenario's)")] = None,
    seed: int = run_default("seed"),
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no node authentication (loopback trials only)")
    ] = False,
    cold: Annotated[bool, typer.Option("--cold", help=COLD_HELP)] = False,
) -> None:
    """Run a scenario on a real SuperLink + SuperNodes on 127.0.0.1 (TLS + node authentication),
    then stop them: `fedge deploy up`, `run` and `down` in one command."""
    from federation.config import ConfigSource, RunConfig
    from simulations.deploy import deploy_local
    from simulations.overrides import fused_run_config

    out = (out or Path("results") / f"{scenario}-deploy" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    sets = _parse_sets(set_ or [])
    # the output folder last: `--set out-dir` is folded into `out` by `default_out`
    config: dict[str, object] = {"scenario": scenario, "seed": seed, **sets, "out-dir": str(out)}
    config.setdefault("device-clock", False)  # real nodes: availability is theirs, not simulated
    if rounds:
        config["num-rounds"] = rounds
    RunConfig.parse(fused_run_config(config), ConfigSource(flag="--set", given=frozenset(sets)))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)

    def on_line(line: str) -> None:
        if "fedge" in line:
            console.print(line.split("INFO", 1)[-1].strip(" :"))

    if insecure:
        from simulations.deploy import INSECURE_WARNING

        _deploy_say(f"WARNING: {INSECURE_WARNING}")
    code = deploy_local(config, on_line=on_line, log_dir=out / "logs", insecure=insecure, cold=cold)
    summary = out / "summary.json"
    if code != 0 or not summary.exists():
        raise FedgeError(f"deployment run failed (exit {code}): see {out / 'logs'}")
    print_summary(json.loads(summary.read_text()))
    console.print(f"results in {out}")


certs_app = typer.Typer(no_args_is_help=True, help="TLS credentials for a deployment (operator CA).")
app.add_typer(certs_app, name="certs")
deploy_app = typer.Typer(
    no_args_is_help=True, help="A local deployment: SuperLink + one SuperNode per device on 127.0.0.1."
)
app.add_typer(deploy_app, name="deploy")
DEPLOY_DIR_HELP = "the deployment's folder: credentials, state file, logs, its own FLWR_HOME"


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="folder for ca.crt, ca.key, ca.pub, superlink.crt/.key")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="a SuperLink host name or IP (repeatable)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace existing files")] = False,
) -> None:
    """Make an operator CA and a SuperLink certificate (default hosts: localhost, 127.0.0.1, ::1)."""
    from simulations.credentials import DEFAULT_HOSTS, init_certificates

    files = init_certificates(directory, host or DEFAULT_HOSTS, force=force)
    console.print(f"CA and SuperLink certificate for {', '.join(host or DEFAULT_HOSTS)} in {files.directory}")
    console.print(f"keep {files.ca_key} with the operator, off the servers (private, 0600)")


@app.command("node-key")
def node_key_cmd(
    name: Annotated[Path, typer.Argument(help="private key file to write; NAME.pub beside it")],
    force: Annotated[bool, typer.Option("--force", help="replace existing files")] = False,
) -> None:
    """Make a SuperNode key pair for Flower's node authentication (OpenSSH EC P-384)."""
    from simulations.credentials import node_key

    private, public = node_key(name, force=force)
    console.print(f"{private} (private, 0600: only on the node) and {public} (`flwr supernode register`)")


@app.command("secagg-key")
def secagg_key_cmd(
    name: Annotated[str, typer.Argument(help="the device's name (its SuperNode's secagg-device-name)")],
    ca: Annotated[Path, typer.Option("--ca", help="the folder of `fedge certs init` (its ca.key)")],
    out: Annotated[Path, typer.Option("--out", help="folder to write devices/NAME.key and .cert in")],
    force: Annotated[bool, typer.Option("--force", help="replace existing files")] = False,
) -> None:
    """Issue a device's certified secure-aggregation signing key from the operator CA (Ed25519)."""
    from simulations.credentials import secagg_device_credential

    key, cert = secagg_device_credential(ca, out, name, force=force)
    console.print(f"{key} (private, 0600: only on the device) and {cert}")
    node_config = f"secagg-device-name='{name}' secagg-credentials='{out}'"
    console.print(f'its SuperNode: --node-config "... {node_config}"')


@deploy_app.command("up")
def deploy_up(
    scenario: Annotated[str, typer.Option(help="named scenario: one SuperNode per device")] = "smoke",
    directory: Annotated[Path, typer.Option("--dir", help=DEPLOY_DIR_HELP)] = Path(".fedge-deploy"),
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no node authentication (loopback trials only)")
    ] = False,
    cold: Annotated[bool, typer.Option("--cold", help=COLD_HELP)] = False,
) -> None:
    """Start a SuperLink (TLS + node authentication) and one registered SuperNode per device."""
    from simulations.deploy import up

    state = up(scenario_argument(scenario), directory, insecure=insecure, on_line=_deploy_say, cold=cold)
    console.print(f"deployment up in {state.directory}: `fedge deploy run`, then `fedge deploy down`")


def _deploy_say(line: str) -> None:
    if line.startswith("WARNING"):
        Console(stderr=True, soft_wrap=True, highlight=False).print(line, style="bold red", markup=False)
    else:
        console.print(line, markup=False, highlight=False)


@deploy_app.command("run")
def deploy_run(
    directory: Annotated[Path, typer.Option("--dir", help=DEPLOY_DIR_HELP)] = Path(".fedge-deploy"),
    rounds: Annotated[int | None, typer.Option(help="rounds (default: the scenario's)")] = None,
    seed: int = run_default("seed"),
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the last run after its last completed round")
    ] = False,
) -> None:
    """Run the deployment's scenario on it (`flwr run` against its own connection)."""
    from simulations.deploy import DeploymentState

    state = DeploymentState.load(directory)
    sets = _parse_sets(set_ or [])
    scenario = state.scenario
    if resume:
        runs = sorted((Path(state.directory) / "results").glob("*/checkpoint.json"))
        if not runs:
            raise FedgeError(f"--resume: no checkpointed run in {Path(state.directory) / 'results'}")
        scenario, saved_rounds, seed, out, sets = resume_settings(runs[-1].parent, sets)
        rounds = rounds or saved_rounds
    out = (out or Path(state.directory) / "results" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    _run_deployed(state, scenario, rounds, seed, out, sets)


def _run_deployed(
    state: object, scenario: str, rounds: int | None, seed: int, out: Path, sets: dict[str, object]
) -> None:
    from federation.config import ConfigSource, RunConfig
    from simulations.deploy import INSECURE_WARNING, DeploymentState, run
    from simulations.overrides import fused_run_config

    assert isinstance(state, DeploymentState)
    # the output folder last: `--set out-dir` is folded into `out` by `default_out`
    config: dict[str, object] = {"scenario": scenario, "seed": seed, **sets, "out-dir": str(out)}
    config.setdefault("device-clock", False)  # real nodes: availability is theirs, not simulated
    if rounds:
        config["num-rounds"] = rounds
    RunConfig.parse(fused_run_config(config), ConfigSource(flag="--set", given=frozenset(sets)))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    if state.insecure:
        _deploy_say(f"WARNING: {INSECURE_WARNING}")

    def on_line(line: str) -> None:
        if "fedge" in line:
            console.print(line.split("INFO", 1)[-1].strip(" :"), markup=False, highlight=False)

    code = run(state, config, on_line=on_line, log_path=out / "flwr-run.log")
    summary = out / "summary.json"
    if code != 0 or not summary.exists():
        raise FedgeError(f"deployment run failed (exit {code}): see {out / 'flwr-run.log'} and {state.logs}")
    print_summary(json.loads(summary.read_text()))
    console.print(f"results in {out}")


@deploy_app.command("status")
def deploy_status(
    directory: Annotated[Path, typer.Option("--dir", help=DEPLOY_DIR_HELP)] = Path(".fedge-deploy"),
) -> None:
    """Which of the deployment's processes are running."""
    from simulations.deploy import DeploymentState, status

    state = DeploymentState.load(directory)
    found = status(state)
    mode = "INSECURE (no TLS, no node auth)" if state.insecure else "TLS + node authentication"
    console.print(f"{state.scenario} on 127.0.0.1:{state.port}, {mode}")
    for line in found["alive"]:
        console.print(f"  running  {line}", markup=False)
    for line in found["exited"]:
        console.print(f"  exited   {line}", markup=False)
    if not found["alive"]:
        console.print("nothing running")


@deploy_app.command("down")
def deploy_down(
    directory: Annotated[Path, typer.Option("--dir", help=DEPLOY_DIR_HELP)] = Path(".fedge-deploy"),
) -> None:
    """Stop exactly the processes `fedge deploy up` started (by PID) and those they started."""
    from simulations.deploy import DeploymentState, down

    stopped = down(DeploymentState.load(directory))
    console.print(f"stopped {stopped} processes")


@bench_app.command("overhead")
def bench_overhead(seed: int = 0) -> None:
    """Local training of the `bench` scenario's 10 devices directly vs. one Flower simulation round."""
    from simulations.bench import overhead

    overhead(seed, console, simulate_scenario)


@bench_app.command("scale")
def bench_scale(seed: int = 0) -> None:
    """Peak RSS with 100 and with 10,000 registered devices (100 per round); last line: ratio."""
    from simulations.bench import scale

    scale(seed, console, simulate_scenario)


@bench_app.command("secagg")
def bench_secagg(
    seed: int = 0,
    sizes: Annotated[str, typer.Option(help="devices per round, comma-separated (10, 50)")] = "10,50",
    legacy: Annotated[bool, typer.Option(help="also run Flower's legacy SecAgg+ as the anchor")] = True,
) -> None:
    """Secure vs. plain rounds (fedge and Flower's legacy SecAgg+); last line: fedge's ratio."""
    from simulations.bench import secagg

    parsed = tuple(int(s) for s in sizes.split(",") if s.strip())
    unknown = set(parsed) - {10, 50}
    if unknown:
        raise FedgeError(f"--sizes {sorted(unknown)}: the benchmark fleets are 10 and 50 devices per round")
    secagg(seed, console, simulate_scenario, parsed, legacy)


@bench_app.command("deploy")
def bench_deploy(
    seed: int = 0, rounds: Annotated[int, typer.Option(help="rounds of each run (>= 2)")] = 3
) -> None:
    """The same small secure scenario simulated and deployed (TLS + node auth); last line: ratio."""
    from simulations.bench import deploy

    if rounds < 2:
        raise FedgeError("--rounds: at least 2 (round 1 is left out of the means)")
    deploy(seed, console, simulate_scenario, rounds)


# -- research: experiments, their reports, and references (issue 9) ---------------------------


@app.command()
def experiment(
    file: Annotated[Path, typer.Argument(help="an experiment .toml (see simulations/experiment.py)")],
    out: Annotated[
        Path | None, typer.Option(help="output folder (default results/experiments/<name>)")
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="only these seeds, comma-separated (a reduced run)")
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="only these methods/references, comma-separated (a reduced run)")
    ] = None,
) -> None:
    """Run a grid of federated runs and references (resumable: finished cells are skipped),
    then write results.csv, results.md and plots."""
    from simulations.experiment import load_experiment, run_experiment, select

    spec = load_experiment(file)
    spec = select(
        spec,
        [int(s) for s in seeds.split(",") if s.strip()] if seeds else None,
        [m.strip() for m in methods.split(",") if m.strip()] if methods else None,
    )
    target = (out or Path("results") / "experiments" / spec.name).resolve()

    def check(scenario: str, rounds: int | None, seed: int, cell_out: Path, sets: dict) -> RunConfig:
        return run_config_for(scenario_argument(scenario), rounds, seed, cell_out, sets)[1]

    def simulate_cell(
        scenario: str, rounds: int | None, seed: int, cell_out: Path, sets: dict, quiet: bool
    ) -> Path:
        return simulate_scenario(scenario, rounds, seed, cell_out, sets, quiet=quiet)

    run_experiment(spec, target, check, simulate_cell, say=lambda line: print(line, flush=True))


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="an experiment's output folder")],
) -> None:
    """Rebuild an experiment's results.csv, results.md and plots from its saved cells."""
    from simulations.report import build_report

    build_report(directory)
    print((directory / "results.md").read_text(encoding="utf-8"), end="")
    console.print(f"wrote {directory / 'results.md'}, results.csv, cells.csv, plots/")


@app.command()
def reference(
    kind: Annotated[str, typer.Option(help="pretrained, centralized or local-only")] = "centralized",
    scenario: Annotated[str, typer.Option(help="named scenario or scenario file")] = run_default("scenario"),
    rounds: Annotated[
        int | None, typer.Option(help="the federated run's rounds (default: the scenario's)")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="seed of the federated run it is a reference for")
    ] = run_default("seed"),
    task: Annotated[
        str | None, typer.Option(help="only this task (default: every task of the scenario)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default results/<scenario>-<kind>/<timestamp>)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    examples_of: Annotated[
        Path | None,
        typer.Option(
            help="a finished run's output folder: train on the examples it trained (the device-rounds "
            "its metrics.jsonl records per task) instead of the scenario's plan"
        ),
    ] = None,
) -> None:
    """A reference for a federated run on the same held-out data (no Flower): the pretrained start,
    centralized LoRA on the pooled training data (same examples), or each device alone."""
    from federation.references import KINDS, read_trained_device_rounds, reference, reference_entries

    if kind not in KINDS:
        raise FedgeError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    scenario = scenario_argument(scenario)
    from federation.scenarios import get_scenario

    name = get_scenario(scenario).name
    target = (out or Path("results") / f"{name}-{kind}" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    _, run = run_config_for(scenario, rounds, seed, target, _parse_sets(set_ or []))
    trained = None if examples_of is None else read_trained_device_rounds(examples_of, run.rounds)
    refs = reference(run, kind, [task] if task else None, trained)
    start, end = reference_entries(refs, refs, run.rounds)
    line = start if kind == "pretrained" else end
    target.mkdir(parents=True, exist_ok=True)
    (target / "metrics.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    detail = {r.task: {"examples": r.examples, "steps": r.steps, "seconds": r.seconds} for r in refs}
    basis = {"examples_of": str(examples_of.resolve()), "device_rounds": trained} if examples_of else {}
    (target / "reference.json").write_text(json.dumps({"kind": kind, "tasks": detail, **basis}, indent=2))
    table = Table(title=f"{kind} reference, {name}, seed {seed}: held-out results")
    for col in ("task", "where", "metrics", "examples"):
        table.add_column(col)
    for r in refs:
        for where, values in (("server", r.eval), ("on devices", r.federated)):
            if values:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "examples")
                table.add_row(r.task, where, shown, str(r.examples))
    console.print(table)
    console.print(f"results in {target}")


def main() -> None:
    try:
        app()
    except FedgeError as exc:
        # one line, as written: no wrapping, no markup ("[tool.flwr.app.config]" is not a tag)
        errors = Console(stderr=True, soft_wrap=True, highlight=False)
        errors.print(f"fedge: {exc}", style="red", markup=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
