"""The CLI's --scenario / --seed defaults are read from pyproject's [tool.flwr.app.config]
(`federation.defaults.run_default`), the one place a run default is written, not repeated."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from federation.defaults import run_default

CLI = Path(__file__).resolve().parents[2] / "simulations" / "cli.py"


def _defaults(function: str) -> dict[str, ast.expr]:
    tree = ast.parse(CLI.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    args = node.args.args[len(node.args.args) - len(node.args.defaults) :]
    return {a.arg: d for a, d in zip(args, node.args.defaults, strict=True)}


def test_simulate_defaults_come_from_pyproject() -> None:
    from simulations import cli

    defaults = _defaults("simulate")
    for option, key in (("scenario", "scenario"), ("seed", "seed")):
        expr = defaults[option]
        assert isinstance(expr, ast.Call) and ast.unparse(expr) == f"run_default({key!r})", ast.unparse(expr)
        assert inspect.signature(cli.simulate).parameters[option].default == run_default(key)
    assert ast.unparse(_defaults("deploy_local_cmd")["seed"]) == "run_default('seed')"
