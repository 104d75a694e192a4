"""The aggregation-rule registry: a rule's name (run setting `aggregation`) -> its `Rule`.

Built-in rules (one module each): `exact-mixed-rank` (the default: a sum, so secure aggregation
carries it) and `median` (coordinate-wise median, not a sum), and the research methods of
docs/methods.md (`fedit`, `ffa-lora`, `fedsa-lora`, `hetlora`, `flexlora`, `flora`,
`fedex-lora`). Server optimizers over any rule: `federation.rules.server_opt`. An installed
package adds a rule through the entry-point group `fedge.rules` (`[project.entry-points."fedge.rules"] NAME =
"package.module:RULE"`). A name found nowhere is refused with the known names listed.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from federation.errors import FedgeError
from federation.rules.base import Rule, Slot, add_mean_delta, upload_size

__all__ = [
    "DEFAULT_RULE",
    "ENTRY_POINT_GROUP",
    "Rule",
    "Slot",
    "add_mean_delta",
    "get_rule",
    "known_rules",
    "upload_size",
]

ENTRY_POINT_GROUP = "fedge.rules"
DEFAULT_RULE = "exact-mixed-rank"
BUILTIN: dict[str, str] = {
    "exact-mixed-rank": "federation.rules.exact_mixed_rank",
    "median": "federation.rules.median",
    "trimmed-mean": "federation.rules.trimmed_mean",
    "krum": "federation.rules.krum",
    # research methods (docs/methods.md), one module each
    "fedit": "federation.rules.fedit",
    "ffa-lora": "federation.rules.ffa_lora",
    "fedsa-lora": "federation.rules.fedsa_lora",
    "hetlora": "federation.rules.hetlora",
    "flexlora": "federation.rules.flexlora",
    "flora": "federation.rules.flora",
    "fedex-lora": "federation.rules.fedex_lora",
}
_resolved: dict[str, Rule] = {}


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_rules() -> list[str]:
    """Every rule name that resolves: built-in, then installed."""
    return [*BUILTIN, *(n for n in sorted(_entry_points()) if n not in BUILTIN)]


def get_rule(name: str) -> Rule:
    """The rule registered under `name`; unknown names are refused naming the known ones."""
    rule = _resolved.get(name)
    if rule is not None:
        return rule
    if name in BUILTIN:
        loaded: object = importlib.import_module(BUILTIN[name]).RULE
    elif (ep := _entry_points().get(name)) is not None:
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken plug-in: say which
            raise FedgeError(f"aggregation rule {name!r} (entry point {ep.value}): {exc}") from None
    else:
        raise FedgeError(f"unknown aggregation rule {name!r}; known rules: {', '.join(known_rules())}")
    if not isinstance(loaded, Rule):
        raise FedgeError(
            f"aggregation rule {name!r} is a {type(loaded).__name__}, not a federation.rules.Rule"
        )
    if loaded.name != name:
        raise FedgeError(f"aggregation rule registered as {name!r} calls itself {loaded.name!r}")
    _resolved[name] = loaded
    return loaded
