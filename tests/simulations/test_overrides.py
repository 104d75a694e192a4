"""`fedge simulate --set KEY=VALUE` reads VALUE exactly as `flwr run -c` does, the value reaches the
run config with the type `-c` gives it, and a bad value's error names the flag the user typed."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from federation.config import ConfigSource, RunConfig
from federation.errors import FedgeError
from simulations.cli import run_config_for
from simulations.overrides import app_config_defaults, fused_run_config, parse_override, parse_overrides
from simulations.runner import run_config_arg, toml_value

# (what the user types after --set, the value fedge reads, what they would type after flwr run -c)
CASES = [
    ("secure-aggregation=false", False, "secure-aggregation=false"),
    ("secure-aggregation=true", True, "secure-aggregation=true"),
    ("device-clock=false", False, "device-clock=false"),
    ("lora-rank=4", 4, "lora-rank=4"),
    ("seed=-3", -3, "seed=-3"),
    ("dropout-after-keys=0.3", 0.3, "dropout-after-keys=0.3"),
    ("lr=1e-3", 0.001, "lr=1e-3"),
    ("round-timeout=600.0", 600.0, "round-timeout=600.0"),
    ("lora-targets='query,key'", "query,key", "lora-targets='query,key'"),
    ('lora-targets="query,key"', "query,key", 'lora-targets="query,key"'),
    ("out-dir='/tmp/my run'", "/tmp/my run", "out-dir='/tmp/my run'"),
    ("scenario='smoke'", "smoke", "scenario='smoke'"),
    # a bare word is not a TOML value: Flower's -c refuses it, fedge reads the string
    ("lora-targets=query,key", "query,key", "lora-targets='query,key'"),
    ("out-dir=/tmp/run", "/tmp/run", "out-dir='/tmp/run'"),
    ("initial-checkpoint=DIR/checkpoint.safetensors", "DIR/checkpoint.safetensors",
     "initial-checkpoint='DIR/checkpoint.safetensors'"),
    ("secure-aggregation=True", "True", "secure-aggregation='True'"),  # TOML is lower case
    ("out-dir=", "", "out-dir=''"),
]  # fmt: skip


@pytest.mark.parametrize(("item", "expected", "dash_c"), CASES)
def test_set_reads_a_value_as_flwr_run_c_does(item: str, expected: object, dash_c: str) -> None:
    key, value = parse_override(item)
    assert value == expected and type(value) is type(expected), (value, expected)
    # `flwr run . -c "<dash_c>"`: Flower's own parser gives the same value of the same type
    flower = parse_config_args([dash_c])
    assert flower == {key: value} and type(flower[key]) is type(value)


@pytest.mark.parametrize(("item", "expected", "dash_c"), CASES)
def test_the_value_reaches_the_run_config_with_flowers_type(item: str, expected: object, dash_c: str) -> None:
    """The path a `--set` value takes: fedge writes `flwr run --run-config`, Flower parses it back
    and fuses it with [tool.flwr.app.config]; it must arrive as `-c` would have delivered it."""
    overrides = parse_overrides([item, "scenario='smoke'"])
    via_fedge = fuse_dicts(app_config_defaults(), parse_config_args([run_config_arg(overrides)]))
    via_flwr_c = fuse_dicts(app_config_defaults(), parse_config_args([dash_c, "scenario='smoke'"]))
    assert via_fedge == via_flwr_c
    assert {k: type(v) for k, v in via_fedge.items()} == {k: type(v) for k, v in via_flwr_c.items()}
    assert via_fedge == fused_run_config(overrides)


@pytest.mark.parametrize(
    "text", ["plain", "with space", "it's", 'say "hi"', "back\\slash", "a=b", "", "C:\\runs\\x y"]
)
def test_strings_survive_flowers_run_config_parser(text: str) -> None:
    arg = run_config_arg({"out-dir": text, "seed": 2, "secure-aggregation": False})
    assert parse_config_args([arg]) == {"out-dir": text, "seed": 2, "secure-aggregation": False}


def test_a_string_flower_cannot_carry_is_refused_at_start() -> None:
    with pytest.raises(FedgeError, match="both quote kinds"):
        toml_value("""it's "both" """)


def test_booleans_set_on_the_cli_validate() -> None:
    """The issue's bug: `--set secure-aggregation=false` stopped with 'must be a bool'."""
    for text, expected in (("false", False), ("true", True)):
        sets = parse_overrides([f"secure-aggregation={text}", f"device-clock={text}"])
        _, run = run_config_for("smoke", 1, 0, Path("/tmp/x"), sets)
        assert run.secure_aggregation is expected
        assert run.device_clock is (expected and run.scenario.device_clock)


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("secure-aggregation=flase", "secure-aggregation"),
        ("secure-aggregation=1", "secure-aggregation"),
        ("lora-rank=four", "lora-rank"),
        ("lora-rank=4.0", "lora-rank"),
        ("lr=-1", "lr"),
        ("seed=1 2", "seed"),
        ("lora-targets=query,foo", "lora-targets"),
    ],
)
def test_a_bad_set_value_names_the_set_flag(item: str, key: str) -> None:
    with pytest.raises(FedgeError) as info:
        run_config_for("smoke", None, 0, Path("/tmp/x"), parse_overrides([item]))
    message = str(info.value)
    assert f"--set {key}=" in message, message
    assert "-c " not in message and "\n" not in message


def test_flower_path_errors_name_dash_c_and_the_pyproject_table() -> None:
    with pytest.raises(FedgeError) as info:
        RunConfig.parse({"secure-aggregation": "false"})  # what the apps get from a quoted -c value
    assert "-c 'secure-aggregation=...'" in str(info.value)
    assert "[tool.flwr.app.config]" in str(info.value)
    assert "--set" not in str(info.value)


def test_a_bad_pyproject_value_under_fedge_names_the_table_and_set() -> None:
    source = ConfigSource(flag="--set", given=frozenset({"seed"}))
    with pytest.raises(FedgeError) as info:
        RunConfig.parse({"lora-rank": "8"}, source)
    assert "[tool.flwr.app.config] of pyproject.toml or with --set lora-rank=" in str(info.value)


@pytest.mark.parametrize("item", ["lora_rank=4", "no-such-key=1"])
def test_an_unknown_key_is_refused_naming_set(item: str) -> None:
    with pytest.raises(FedgeError, match=r"--set .* is not a run-config key"):
        parse_overrides([item])


@pytest.mark.parametrize("item", ["lora-rank", "=4", "lora rank=4"])
def test_a_malformed_item_is_refused(item: str) -> None:
    with pytest.raises(FedgeError, match="use KEY=VALUE"):
        parse_overrides([item])


def test_the_pyproject_defaults_are_flowers_flattening() -> None:
    import tomllib

    from federation.defaults import APP_DIR

    table = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config_defaults() == flatten_dict(table)
    assert isinstance(app_config_defaults()["secure-aggregation"], bool)
