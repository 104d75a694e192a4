"""The aggregation-rule interface: plain functions over explicit state (in the manner of FedJAX's
`FederatedAlgorithm` and Flower's strategies).

A rule says
- what a device uploads from its trained adapter (`upload`), and its layout for a task's state
  shapes (`layout`: every key, its shape, and whether it is a value or the weights behind values);
- how the server refuses a malformed upload (`check`);
- the server's streamed aggregate: `init` -> `add` (one upload, or an already-summed batch of them
  for a sum rule) -> `finalize` (the mean delta per key);
- how the global state moves (`update`);
- whether it is a **sum** of device uploads (`is_sum`): only then can secure aggregation, which
  reveals nothing but the sum, carry it; a rule that is not says why (`not_sum_reason`), and a run
  asking for both is refused at config parse.

State keys are `task/key` on the server (one aggregate for every task of a round); `layout` and
`check` see one task's keys without the prefix.

A rule also says how a device holds its LoRA adapter (`Adapter`, honoured by
`federation.model.edge.TaskModel` and `federation.local`): whether A is frozen and derived from
the run seed (fedge's default) or part of the global state and trained; whether B is trained
with LoRA-FA or AdamW; whether the global state carries a *residual* merged into each target's
frozen weight; whether a device of rank r holds the global adapter beyond r frozen or drops it;
which keys stay on the device; and whether every device must train one rank.

Global state keys of one task (docs/methods.md, "Global state"):
- `lora.<layer>.lora_B.weight` [out, r_max(, 1)]: always;
- `lora.<layer>.lora_A.weight` [r_max, in(, k)]: only for a rule whose `Adapter.train_a`;
- `lora.<layer>.lora_residual` [the base weight's shape]: only for `Adapter.residual`. The
  layer's weight is W0 + s (R + B A) with s = alpha / r_max: R is in the adapter's own units,
  so the LoRA scaling is applied once, where the weight is formed (server evaluation and
  devices alike), never by a rule;
- `head.<name>`: the task head. A head module named `classes` (`head.classes.weight` [n_classes,
  features], `head.classes.bias` [n_classes]) holds one output row per class of the task; a rule
  may weigh those rows class by class (`is_class_row_key`; exact-mixed-rank averages each class's
  rows over the devices that hold the class).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Slot:
    """One uploaded key.

    A *weights* slot (`weights=True`) holds the device's weight (a positive integer number of
    examples) on a prefix of its entries, at least the first, and 0 on the rest; a *class*
    weights slot (`classes=True`, behind a head's class rows) holds it on the classes the device
    holds, in any pattern (at least one entry), and 0 on the rest.
    A *value* slot holds the device's weight times its delta for the same key; `weighted_by` names
    the weights slot behind it and `axis` the value's axis those weights run along (None: the
    weights slot has one entry, behind the whole key).
    Secure aggregation encodes values and weights from this declaration alone
    (`federation.secagg.vector`).
    """

    shape: tuple[int, ...]
    weights: bool = False
    weighted_by: str = ""
    axis: int | None = None
    classes: bool = False


@dataclass(frozen=True)
class Adapter:
    """How a device holds and trains the LoRA adapter under a rule (the device honours it)."""

    train_a: bool = False  # A is in the global state and trained on devices (else frozen, from the seed)
    lora_fa: bool = True  # B trained with LoRA-FA (needs A frozen); False: AdamW on every trained LoRA matrix
    residual: bool = False  # the global state carries `<layer>.lora_residual`, merged into the frozen weight
    truncate: bool = False  # a rank-r device drops the global adapter beyond r (else holds it frozen, merged)
    upload_full: bool = False  # the device hands `upload` its trained A / B themselves, not their deltas
    kept_on_device: tuple[str, ...] = ()  # key fragments (".lora_B.") of state a device keeps, never sends
    uniform_rank: bool = False  # every device must train one rank (mixed ranks need `uniform-rank`)

    def __post_init__(self) -> None:
        if self.train_a and self.lora_fa:
            raise ValueError("LoRA-FA trains B under a frozen A: a rule that trains A sets lora_fa=False")

    def keeps(self, key: str) -> bool:
        """Whether the device keeps this state key (trains it, never uploads it)."""
        return any(fragment in key for fragment in self.kept_on_device)


DEFAULT_ADAPTER = Adapter()


@dataclass(frozen=True)
class Rule:
    """An aggregation rule as a record of plain functions; the server state `S` is explicit."""

    name: str
    paper: str  # where the rule comes from
    is_sum: bool  # the aggregate needs only the sum of the uploads
    not_sum_reason: str  # for a rule that is not a sum: why secure aggregation cannot carry it
    layout: Callable[[Shapes], dict[str, Slot]]
    # (delta, weight, rank[, classes]); a rule with `class_rows` also takes `classes`: the task
    # classes the device holds (bool, one per class row of the head), or None (weigh every row)
    upload: Callable[..., dict[str, np.ndarray]]
    check: Callable[[Arrays, Shapes, float], str | None]  # (upload, shapes, max weight) -> why not
    init: Callable[[], Any]
    add: Callable[[Any, Arrays], Any]
    finalize: Callable[[Any], dict[str, np.ndarray]]  # the mean delta of every key someone trained
    update: Callable[[Arrays, Arrays, float], dict[str, np.ndarray]]  # (global, aggregate, server lr)
    adapter: Adapter = DEFAULT_ADAPTER  # how devices hold the adapter under this rule
    # On the device, optional: the rank it trains this round from its kept state and its tier's
    # rank (HetLoRA's self-pruning), and what it keeps after training (kept, trained state, rank).
    device_rank: Callable[[Arrays, int], int] | None = None
    device_keep: Callable[[Arrays, Arrays, int], dict[str, np.ndarray]] | None = None
    # The rule weighs a head's class rows by the classes each device holds (`upload`'s 4th argument)
    class_rows: bool = False
    # An average of two of the rule's global states is a model between theirs, so the server may
    # serve a moving average of them (federation.served_average); False: say why not
    state_averages: bool = True
    not_averaged_reason: str = ""

    def __post_init__(self) -> None:
        if not self.is_sum and not self.not_sum_reason:
            raise ValueError(f"rule {self.name!r} is not a sum and must say why (not_sum_reason)")
        if not self.state_averages and not self.not_averaged_reason:
            raise ValueError(
                f"rule {self.name!r}: a state that does not average must say why (not_averaged_reason)"
            )


def device_upload(
    rule: Rule, delta: Arrays, weight: float, rank: int | None, classes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """`rule.upload` as a device calls it: the classes it holds go only to a rule with `class_rows`
    (a rule written without them keeps its three-argument `upload`)."""
    if rule.class_rows:
        return rule.upload(delta, weight, rank, classes)
    return rule.upload(delta, weight, rank)


def add_mean_delta(global_state: Arrays, aggregate: Arrays, server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """The usual update: each key the aggregate holds moves by server_lr x its mean delta (float64
    arithmetic, stored in the state's dtype); every other key keeps its value."""
    new = {k: np.array(v, copy=True) for k, v in global_state.items()}
    for key, mean in aggregate.items():
        if key in new:
            new[key] = (new[key].astype(np.float64) + server_lr * mean).astype(new[key].dtype)
    return new


def upload_size(layout: Mapping[str, Slot]) -> int:
    """Coordinates in one upload."""
    return sum(int(np.prod(slot.shape)) for slot in layout.values())


# -- LoRA state keys and products (numpy; shared by the rules that pair A with B) -------------

A_PART, B_PART, RESIDUAL = ".lora_A.", ".lora_B.", ".lora_residual"
CLASS_ROWS = "head.classes."


def is_class_row_key(key: str) -> bool:
    """A head parameter whose rows (axis 0) are the task's classes (`head.classes.weight`, `.bias`),
    with or without the server's task prefix (`sensor/head.classes.weight`)."""
    return key.rpartition("/")[2].startswith(CLASS_ROWS)


def is_b_key(key: str) -> bool:
    return B_PART in key


def is_a_key(key: str) -> bool:
    return A_PART in key


def is_residual_key(key: str) -> bool:
    return key.endswith(RESIDUAL)


def a_key_of(b_key: str) -> str:
    """The A key of the layer whose B key this is (`...lora_B.weight` -> `...lora_A.weight`)."""
    return b_key.replace(B_PART, A_PART)


def b_key_of(a_key: str) -> str:
    """The B key of the layer whose A key this is."""
    return a_key.replace(A_PART, B_PART)


def residual_key_of(b_key: str) -> str:
    """The residual key of the layer whose B key this is (`...lora_B.weight` -> `...lora_residual`)."""
    head, _, _ = b_key.partition(B_PART)
    return head + RESIDUAL


def lora_product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """B A in the shape of the layer's weight, in float64: Linear B [out, r], A [r, in] -> [out, in];
    Conv1d B [out, r, 1], A [r, in, k] -> [out, in, k] (as `federation.model.lora.lora_product`)."""
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if b.ndim not in (2, 3) or (b.ndim == 3 and b.shape[2] != 1) or b.shape[1] != a.shape[0]:
        raise ValueError(f"cannot multiply LoRA B {b.shape} by A {a.shape}")
    return np.einsum("or,r...->o...", b.reshape(b.shape[0], b.shape[1]), a)
