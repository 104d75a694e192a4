"""Every command the README shows works as written.

The commands are read from README.md itself (every line of its fenced shell blocks, and inline
`fedge ...` spans), so a command added to the README is checked without touching this file;
one this file does not know how to check fails `test_every_readme_command_has_a_check`.

How each command is checked (each in a subprocess, from the repository root, as the README says):
- `fedge simulate ...` as written plus `--dry-run`: its arguments and `--set` values are parsed
  and validated through the CLI's own path and the run config it would hand Flower is printed;
  each `--set KEY=VALUE` must arrive there with the value and type `flwr run -c` gives it;
- one README simulation really runs in the default suite (the `--set secure-aggregation=false`
  line, as `--scenario smoke --rounds 1`, stdout piped: it must print a line per round); every
  other simulation, `fedge deploy-local` and the by-hand `flwr run .` run the same way, marked slow;
- long runs and commands that rewrite shipped files (`fedge bench ...`, `fedge pretrain-imu`)
  run with `--help`; the install script is syntax-checked (CI runs it verbatim on a fresh clone);
  the test command collects the suite (`--collect-only`) rather than running it inside itself.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulations.overrides import parse_override
from simulations.runner import TOKEN_VAR, _free_port, stop_processes

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)  # other blocks: diagrams
INLINE_FEDGE = re.compile(r"`((?:\.venv/bin/)?fedge [^`]+)`")
README_SET = re.compile(r"--set ([a-z][a-z0-9-]*=[^\s`]+)")
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b|<[^>]+>|\.\.\.")  # DIR, KEY=VALUE, <connection>, '...'
SLOW_TIMEOUT_S = 900
PLAIN_SHELL = ("mkdir", "echo")  # setup lines the README shows, run as written


@dataclass
class ReadmeCommand:
    """One command of the README: its text, and the `export`s and setup lines (mkdir, echo)
    before it in the same block, which a by-hand command relies on."""

    text: str
    prelude: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    readme: str  # the README command this checks
    how: str  # "as written", "--dry-run", "smoke, 1 round", "--help", ...
    script: str  # the bash that runs (from the repository root)
    slow: bool = False
    real_run: bool = False  # a simulation whose outputs are checked


def _logical_lines(block: str) -> list[str]:
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def readme_commands(text: str) -> list[ReadmeCommand]:
    """Every command in README's shell blocks (in order), then inline fedge commands not among them."""
    commands: list[ReadmeCommand] = []
    for block in SHELL_BLOCK.findall(text):
        prelude: list[str] = []
        for line in _logical_lines(block):
            if line.startswith("export "):
                prelude.append(line)
                continue
            commands.append(ReadmeCommand(line, list(prelude)))
            if line.split()[0] in PLAIN_SHELL:
                prelude.append(line)
    shown = {shlex.join(shlex.split(c.text, comments=True)) for c in commands}
    for span in INLINE_FEDGE.findall(text):
        if PLACEHOLDER.search(span):
            continue  # a pattern (`--out DIR`, `--set KEY=VALUE`), not a command
        if shlex.join(shlex.split(span)) not in shown:
            commands.append(ReadmeCommand(span))
            shown.add(shlex.join(shlex.split(span)))
    return commands


def _segments(command: str) -> list[list[str]]:
    """`a && b # comment` -> [[a...], [b...]]."""
    tokens = shlex.split(command, comments=True)
    out: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            out.append([])
        else:
            out[-1].append(token)
    return [s for s in out if s]


def _program(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(leading NAME=value assignments, the command itself)."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]):
        i += 1
    return tokens[:i], tokens[i:]


def _replace_options(args: list[str], values: dict[str, str]) -> list[str]:
    """Drop the given `--option VALUE`s from args, then append them with the new values."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in values:
            skip = True
            continue
        if arg.split("=", 1)[0] in values:
            continue
        kept.append(arg)
    for option, value in values.items():
        kept += [option, value]
    return kept


def _fedge_checks(readme: str, assignments: list[str], args: list[str], out: str) -> list[Check]:
    sub, rest = (args[0], args[1:]) if args else ("", [])
    fedge = [*assignments, str(VENV_BIN / "fedge")]  # `fedge` in the README: the venv's
    if "--dry-run" in rest or "--help" in rest:  # runs nothing: as written
        return [Check(readme, "as written", shlex.join([*fedge, sub, *rest]))]
    if sub == "simulate":
        smoke = _replace_options(rest, {"--scenario": "smoke", "--rounds": "1", "--out": out})
        real = "secure-aggregation=false" in rest  # the headline: a bool through --set
        return [
            Check(readme, "--dry-run", shlex.join([*fedge, sub, *rest, "--dry-run"])),
            Check(readme, "smoke, 1 round", shlex.join([*fedge, sub, *smoke]), slow=not real, real_run=True),
        ]
    if sub == "deploy-local":
        smoke = _replace_options(rest, {"--scenario": "smoke", "--rounds": "1", "--out": out})
        return [
            Check(readme, "--help", shlex.join([*fedge, sub, "--help"])),
            Check(readme, "smoke, 1 round", shlex.join([*fedge, sub, *smoke]), slow=True, real_run=True),
        ]
    if sub in ("certs", "node-key"):  # writes credentials: as written, in a fresh folder
        folder = shlex.quote(out)
        script = f"mkdir -p {folder} && cd {folder} && " + shlex.join([*fedge, sub, *rest])
        return [Check(readme, "as written, in a fresh folder", script)]
    if sub == "secagg-key":  # needs the CA that `fedge certs init` makes: made first, in a fresh folder
        ca = rest[rest.index("--ca") + 1]
        written = rest[rest.index("--out") + 1]
        folder = shlex.quote(out)
        script = (
            f"mkdir -p {folder} && cd {folder} && "
            + shlex.join([*fedge, "certs", "init", ca])
            + " && "
            + shlex.join([*fedge, sub, *rest])
            + " && test -f "
            + shlex.quote(f"{written}/devices/{rest[0]}.cert")
        )
        return [Check(readme, "as written, after certs init, in a fresh folder", script)]
    if sub == "deploy":  # starts long-lived processes (tests/deployment runs them): --help
        return [Check(readme, "--help", shlex.join([*fedge, sub, *rest[:1], "--help"]))]
    if sub in ("scenarios", "prepare"):
        return [Check(readme, "as written", shlex.join([*fedge, sub, *rest]))]
    if sub in ("experiment", "report", "reference"):  # long runs (tests/simulations/test_experiment.py)
        return [Check(readme, "--help", shlex.join([*fedge, sub, "--help"]))]
    if sub in ("bench", "pretrain-imu"):  # long runs; pretrain-imu rewrites the shipped encoder
        return [Check(readme, "--help", shlex.join([*fedge, sub, *rest, "--help"]))]
    return []


def checks_for(command: ReadmeCommand, out: str) -> list[Check]:
    """How to check one README command; [] if this file does not know (a test failure)."""
    segments = _segments(command.text)
    programs = [Path(_program(s)[1][0]).name if _program(s)[1] else "" for s in segments]
    if any(op in s for s in segments for op in (">", "|", ";", "<")):  # shell plumbing
        if all(p in PLAIN_SHELL for p in programs):
            return [Check(command.text, "as written", command.text)]
        return []
    checks: list[Check] = []
    for tokens, name in zip(segments, programs, strict=True):
        assignments, argv = _program(tokens)
        if argv[:2] == ["bash", "scripts/install.sh"]:
            checks.append(Check(command.text, "syntax (CI runs it)", "bash -n scripts/install.sh"))
        elif name == "fedge":
            found = _fedge_checks(command.text, assignments, argv[1:], out)
            if not found:
                return []
            checks += found
        elif name == "pip" and argv[1:3] == ["install", "-e"] and len(argv) == 4:
            # a local package: its metadata builds and pip would install it (no index reached)
            script = shlex.join(
                [
                    str(VENV_BIN / "pip"),
                    "install",
                    "--no-deps",
                    "--no-index",
                    "--no-build-isolation",
                    "--dry-run",
                    "-e",
                    argv[3],
                ]
            )
            checks.append(Check(command.text, "pip --dry-run", script))
        elif name in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
            script = shlex.join([sys.executable, "-m", "pytest", *argv[3:], "--collect-only"])
            checks.append(Check(command.text, "--collect-only", script))
        elif name == "flwr" and argv[1:3] == ["run", "."] and len(segments) == 1:
            # the README's line as written (its NAME=value prefixes and quoting kept), on the
            # smoke fleet for one round, after the `export`s and setup lines of its block
            line = re.sub(r"\s+#[^'\"]*$", "", command.text)  # a trailing comment
            line = re.sub(r"num-supernodes=\d+", "num-supernodes=9", line)
            line += f""" -c "scenario='smoke' num-rounds=1 out-dir='{out}'\""""
            checks.append(Check(command.text, "--help", "flwr run --help"))
            script = " && ".join([*command.prelude, line])
            checks.append(Check(command.text, "smoke, 1 round", script, slow=True, real_run=True))
        else:
            return []
    return checks


def _env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the README's `fedge`: the venv's
            TOKEN_VAR: token,  # everything a command starts carries it: stopped by PID afterwards
            "HF_HUB_OFFLINE": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # a local SuperLink that `flwr run .` starts listens on free ports: never a user's
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        }
    )
    return env


def run_check(check: Check, timeout_s: float) -> subprocess.CompletedProcess[str]:
    token = secrets.token_hex(8)
    try:
        return subprocess.run(
            ["bash", "-c", check.script],
            cwd=ROOT,
            env=_env(token),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    finally:
        stop_processes(token)


COMMANDS = readme_commands(README.read_text())
OUT = "{out}"  # replaced by a temporary folder per check


def _all_checks() -> list[Check]:
    """Each distinct check once (`fedge simulate` and `.venv/bin/fedge simulate` are one run)."""
    unique: dict[str, Check] = {}
    for command in COMMANDS:
        for check in checks_for(command, OUT):
            unique.setdefault(check.script, check)
    return list(unique.values())


def _param(check: Check) -> pytest.param:  # type: ignore[valid-type]
    marks = [pytest.mark.slow] if check.slow else []
    return pytest.param(check, id=f"{check.readme[:60]} [{check.how}]", marks=marks)


# ------------------------------------------------------------------------ reading the README


def test_the_readme_commands_are_found() -> None:
    texts = [c.text for c in COMMANDS]
    assert any("fedge simulate --set secure-aggregation=false" in t for t in texts)
    assert any(t.startswith("flwr run .") or "flwr run ." in t for t in texts)
    assert any("bash scripts/install.sh && .venv/bin/python -m pytest -q" in t for t in texts)
    assert ".venv/bin/fedge simulate --scenario smoke" in texts  # an inline one


def test_every_readme_command_has_a_check() -> None:
    unknown = [c.text for c in COMMANDS if not checks_for(c, OUT)]
    assert not unknown, f"README commands this test cannot check (teach checks_for): {unknown}"


def test_every_readme_set_is_checked_through_the_cli() -> None:
    """Every `--set KEY=VALUE` the README mentions, inline ones too, reaches a --dry-run check or
    the direct check below."""
    sets = set(README_SET.findall(README.read_text()))
    assert "secure-aggregation=false" in sets and "lora-rank=4" in sets
    dry_runs = " ".join(c.script for c in _all_checks() if c.how == "--dry-run")
    inline_only = {s for s in sets if f"--set {s}" not in dry_runs}
    for item in inline_only:  # e.g. `--set uniform-rank=4`, `--set initial-checkpoint=DIR/...`
        key, value = parse_override(item)
        assert isinstance(value, type(tomllib.loads((ROOT / "pyproject.toml").read_text())
                                      ["tool"]["flwr"]["app"]["config"][key])), item  # fmt: skip


# ------------------------------------------------------------------------- running them


@pytest.mark.parametrize("check", [_param(c) for c in _all_checks() if not c.real_run])
def test_readme_command(check: Check, tmp_path: Path) -> None:
    script = check.script.replace(OUT, str(tmp_path / "out"))
    done = run_check(Check(check.readme, check.how, script), timeout_s=120)
    assert done.returncode == 0, (
        f"README: {check.readme}\nran: {script}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    if check.how == "--dry-run" or (check.how == "as written" and "--dry-run" in check.script):
        printed = tomllib.loads(done.stdout)
        for item in README_SET.findall(check.readme):
            key, value = parse_override(item)
            assert printed[key] == value and type(printed[key]) is type(value), (item, printed[key])
    if check.how == "--collect-only":
        assert re.search(r"\d+(/\d+)? tests? collected", done.stdout), done.stdout[-500:]


@pytest.mark.parametrize("check", [_param(c) for c in _all_checks() if c.real_run])
def test_readme_run(check: Check, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = check.script.replace(OUT, str(out))
    done = run_check(Check(check.readme, check.how, script), timeout_s=SLOW_TIMEOUT_S)
    assert done.returncode == 0, (
        f"README: {check.readme}\nran: {script}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and set(summary["tasks"]) == {"phone", "tv", "sensor"}
    if "fedge simulate" in check.script:
        # stdout is a pipe here: one plain line per round, from metrics.jsonl, as the run goes
        rounds = re.findall(r"^round (\d+)/1\b.*elapsed", done.stdout, flags=re.M)
        assert rounds == ["0", "1"], done.stdout[-2000:]
    if "secure-aggregation=false" in check.script:  # the bool reached the ServerApp as false
        assert "secure-aggregation = false" in (out / "flwr.log").read_text()
