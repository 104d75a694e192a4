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


def test_set_out_dir_is_the_output_folder_and_a_second_one_is_refused(tmp_path: Path) -> None:
    """`--set out-dir=DIR` names the folder `--out` does: the CLI watches, and reports from, the
    folder the server writes (it once watched its own default and called a finished run failed)."""
    import pytest

    from federation.errors import FedgeError
    from simulations.cli import default_out, run_config_for

    chosen = default_out("smoke", None, {"out-dir": str(tmp_path / "mine")})
    assert chosen == (tmp_path / "mine").resolve()
    config, run = run_config_for("smoke", None, 0, chosen, {"out-dir": "elsewhere"})
    assert config["out-dir"] == run.out_dir == str(chosen)
    same = {"out-dir": str(tmp_path / "a")}
    assert default_out("smoke", tmp_path / "a", same) == (tmp_path / "a").resolve()
    with pytest.raises(FedgeError, match="name two output folders"):
        default_out("smoke", tmp_path / "a", {"out-dir": str(tmp_path / "b")})
    assert default_out("smoke", None, {}).parent.name == "smoke"  # results/smoke/<timestamp>
