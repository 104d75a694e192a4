"""`fedge simulate --set KEY=VALUE`: run-config overrides read exactly as `flwr run -c` reads them.

VALUE goes through Flower's own parser for `-c` (`flwr.common.config.parse_config_args`, which
reads it as a TOML value), so `true`/`false` are booleans, `4` an int, `0.3` a float and
`'text'` or `"text"` a string, with the same types `flwr run . -c "KEY=VALUE"` gives. One
addition: a VALUE that is not a TOML value at all (Flower refuses it), such as `query,key` or
`/tmp/run`, is taken as that string, as fedge always did; with `-c` it must be quoted.

The overrides are then fused with the app's `[tool.flwr.app.config]` by Flower's own
`fuse_dicts`, which is what the ServerApp and ClientApps receive as `context.run_config`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import click
from flwr.app import UserConfigValue
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from federation.config import unknown_setting_error
from federation.defaults import run_defaults
from federation.errors import FedgeError

SET_FLAG = "--set"


def app_config_defaults() -> dict[str, UserConfigValue]:
    """The app's `[tool.flwr.app.config]`, flattened as Flower flattens it."""
    return flatten_dict(dict(run_defaults()))


def _is_one_token(raw: str) -> bool:
    # Flower's -c splits a line into space-separated pairs and drops what it cannot pair; one
    # --set is one KEY=VALUE, so a VALUE with spaces outside quotes is not a TOML value here.
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return True
    return not any(c.isspace() for c in text)


def parse_override(item: str, flag: str = SET_FLAG) -> tuple[str, UserConfigValue]:
    """One `KEY=VALUE` override: VALUE as `flwr run -c` reads it, else the bare string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(c.isspace() for c in key):
        raise FedgeError(f"{flag} {item!r}: use KEY=VALUE, e.g. {flag} lora-rank=4")
    if _is_one_token(raw):
        try:
            parsed = parse_config_args([f"{key}={raw.strip()}"])
        except (click.ClickException, ValueError):  # not a TOML value (or a TOML date)
            parsed = {}
        if list(parsed) == [key]:
            return key, parsed[key]
    return key, raw


def parse_overrides(
    items: Iterable[str], flag: str = SET_FLAG, known: Iterable[str] | None = None
) -> dict[str, UserConfigValue]:
    """`--set` items in order (a later one wins), each key checked against the app's config keys."""
    known_keys = set(app_config_defaults() if known is None else known)
    out: dict[str, UserConfigValue] = {}
    for item in items:
        key, value = parse_override(item, flag)
        refusal = unknown_setting_error([key], known_keys)
        if refusal:
            raise FedgeError(f"{flag} {item!r}: {key} is not a run-config key; {refusal}")
        out[key] = value
    return out


def fused_run_config(overrides: Mapping[str, UserConfigValue]) -> dict[str, UserConfigValue]:
    """The run config the apps will see: `[tool.flwr.app.config]` fused with the overrides, by Flower."""
    try:
        return fuse_dicts(app_config_defaults(), dict(overrides))
    except ValueError as exc:  # an unknown key
        raise FedgeError(f"run config: {exc}") from None
