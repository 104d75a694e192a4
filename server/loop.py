"""The round loop: check-in, sample, send the task's global state, aggregate, evaluate, save.

The shape of a Flower strategy (configure -> send/receive -> aggregate -> evaluate), written on
the Grid directly because fedge's global state is per task: a device receives only its task's
adapters and head, and each key is averaged over the devices that uploaded it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from federation.checkpoint import completed_rounds, load_checkpoint, save_checkpoint, write_metrics
from federation.config import RunConfig
from federation.data.common import stable_seed
from federation.errors import FedgeError
from federation.metrics import PRIMARY_METRIC, add_sums, finalize
from federation.model.edge import initial_state, task_slice
from federation.rules.server_opt import STATE_PREFIX, split_server_opt
from federation.rules.server_opt import step as server_opt_step
from federation.served_average import SERVED_PREFIX, split_served
from federation.served_average import update as served_update
from federation.tasks import get_task
from server.messaging import send_and_stream
from server.round import MetricsEntry, RoundResult
from server.status import CHECKED_IN, DONE, WAITING, write_status

NODE_WAIT_S = 120.0  # for the whole fleet to connect; a node later than this joins a later round


@dataclass
class NodeInfo:
    device_class: str
    task: str
    data_client: str
    tier: str = ""  # hardware tier, as the device reported it at check-in
    rank: int = 0  # its tier's LoRA rank


@dataclass
class Registry:
    """What the server knows of each node after its check-in (no data, only its class)."""

    nodes: dict[int, NodeInfo] = field(default_factory=dict)
    # nodes that never answered their check-in: not asked again (a dead node Flower still lists
    # would stall every round by the reply timeout); one that answered with an error is asked
    # again next round (an error comes back at once, and a restarted node keeps its id)
    refused: set[int] = field(default_factory=set)

    def ordered(self, nodes: Iterable[int] | None = None) -> list[int]:
        """Checked-in nodes (all, or those of `nodes`) in the order of the devices they are, by
        (class, data client), not by node id: Flower draws node ids anew in every run, and the
        server's seeded draws pick positions in this order, so a seed picks the same devices in
        every run of it (sorted by node id, one seed sampled other phones and TVs each run)."""
        chosen = self.nodes if nodes is None else nodes
        return sorted(chosen, key=lambda n: (self.nodes[n].device_class, self.nodes[n].data_client, n))

    def of_class(self, device_class: str) -> list[int]:
        return self.ordered(n for n, info in self.nodes.items() if info.device_class == device_class)

    def of_task(self, task: str) -> list[int]:
        return self.ordered(n for n, info in self.nodes.items() if info.task == task)


def _out_dir(run: RunConfig) -> Path:
    if run.out_dir:
        path = Path(run.out_dir)
    else:
        path = Path("results") / run.scenario.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _wait_for_nodes(grid: Grid, wanted: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    if not nodes:
        raise FedgeError(
            f"no SuperNode connected within {NODE_WAIT_S:.0f} s: start SuperNodes (or use `fedge simulate`)"
        )
    if len(nodes) < wanted:
        log(
            WARNING,
            "fedge: scenario fleet has %d devices but only %d nodes are connected; run with "
            "--federation-config 'num-supernodes=%d' for the whole fleet",
            wanted,
            len(nodes),
            wanted,
        )
    return nodes


def check_in(grid: Grid, registry: Registry, nodes: list[int], timeout: float) -> None:
    """Ask nodes never seen before which device they are (one light QUERY round trip)."""
    unknown = [n for n in nodes if n not in registry.nodes and n not in registry.refused]
    if not unknown:
        return
    answered: set[int] = set()
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"check-in": 1})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in unknown
    ]
    for node, reply in send_and_stream(grid, messages, timeout):
        answered.add(node)
        if reply.has_error():
            log(WARNING, "fedge: node %d failed check-in: %s", node, reply.error.reason)
            continue  # (an error comes back fast: asked again next round, as a restarted node)
        info = reply.content["device"]
        registry.nodes[node] = NodeInfo(
            str(info["device-class"]),
            str(info["task"]),
            str(info["data-client"]),
            str(info.get("tier", "")),
            int(info.get("rank", 0)),
        )
    silent = [n for n in unknown if n not in answered]
    if silent:
        log(
            WARNING,
            "fedge: %d node(s) never answered check-in within %.0f s: %s",
            len(silent),
            timeout,
            silent,
        )
        registry.refused.update(silent)


def sample(
    registry: Registry,
    per_round: Mapping[str, int],
    seed: int,
    server_round: int,
    among: list[int] | None = None,
) -> list[int]:
    """Per class, a seeded draw of the round's devices among those checked in (or `among`)."""
    rng = np.random.default_rng(stable_seed("sample", seed, server_round))
    allowed = set(among) if among is not None else None
    chosen: list[int] = []
    for device_class, count in per_round.items():
        pool = [n for n in registry.of_class(device_class) if allowed is None or n in allowed]
        if pool and count:
            # Draw indices: node ids are 64-bit unsigned and numpy would turn them into floats.
            picks = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
            chosen.extend(pool[int(i)] for i in sorted(picks))
    return chosen


class RunState:
    """The server's state of one run: global shared state, registry, simulated clock, outputs."""

    def __init__(
        self, grid: Grid, run: RunConfig, run_id: int = 0, run_config: Mapping[str, Any] | None = None
    ) -> None:
        self.grid, self.run, self.run_id = grid, run, run_id
        # the run config as Flower gave it: a checkpoint carries it, so `--resume` needs nothing else
        self.run_config = {k: v for k, v in (run_config or {}).items() if k != "initial-checkpoint"}
        self.tasks = run.scenario.tasks
        self.out = _out_dir(run)
        self.registry = Registry()
        self.state = initial_state(self.tasks, run.lora, run.seed, run)
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        self.start_round = 1
        self.metrics_path = self.out / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.sim_time_s = run.scenario.start_hour * 3600.0  # the simulated clock (device-clock)
        self.accountant = None  # distributed DP's privacy ledger (federation/privacy/accountant.py)
        if run.dp:
            from federation.privacy.accountant import PrivacyAccountant

            self.accountant = PrivacyAccountant(run.dp_delta, run.dp_noise_multiplier, run.dp_mechanism)
        self.server_opt_state: dict[str, np.ndarray] = {}  # the server optimizer's moments (checkpointed)
        # the moving average of the global states that is evaluated and exported (served-average > 0;
        # None until the first trained round; checkpointed)
        self.served: dict[str, np.ndarray] | None = None
        if run.initial_checkpoint:
            self._resume(run.initial_checkpoint)

    def _resume(self, path: str) -> None:
        """Continue after the checkpoint's round: its global state, simulated clock and the
        metrics of the rounds it covers (a round whose metrics were written but whose checkpoint
        was not is dropped, and runs again: no round is counted twice). Every random draw of a
        round is seeded by (seed, round[, device]) alone, so no RNG state needs restoring."""
        state, info = load_checkpoint(path)
        state, self.server_opt_state = split_server_opt(state)
        state, served = split_served(state)
        missing, extra = sorted(set(self.state) - set(state)), sorted(set(state) - set(self.state))
        reshaped = sorted(k for k in set(state) & set(self.state) if tuple(state[k].shape) != self.shapes[k])
        if missing or extra or reshaped:
            # name the keys: a renamed parameter (a checkpoint of another fedge version) and a
            # changed setting read alike otherwise
            differ = "; ".join(
                f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("lacks", missing), ("has unknown", extra), ("reshaped", reshaped))
                if keys
            )
            raise FedgeError(
                f"checkpoint {path} does not match this run's model ({differ}): resume with the settings "
                "it was made with (scenario, lora-rank, lora-targets, tv-user-dim, aggregation) and the "
                "fedge version that wrote it"
            )
        for key, ours in (("scenario", self.run.scenario.name), ("seed", self.run.seed)):
            if key in info and info[key] != ours:
                raise FedgeError(
                    f"checkpoint {path} is of {key} {info[key]!r}, this run's is {ours!r}: "
                    f"resume with the {key} it was made with"
                )
        self.state = state
        done = int(info.get("round", 0))
        if served is not None and (
            set(served) != set(state) or any(served[k].shape != state[k].shape for k in state)
        ):  # a damaged or foreign checkpoint: refused at start, not after a round's training
            raise FedgeError(
                f"checkpoint {path}: its served average does not match its global state (keys or "
                "shapes differ): the file is damaged or was not written by fedge"
            )
        if self.run.served_average > 0:
            if served is not None:
                self.served = served
            elif done > 0:  # a checkpoint of a run that served its latest state: the average starts here
                self.served = {k: np.array(v, copy=True) for k, v in state.items()}
                log(WARNING, "fedge: checkpoint %s holds no served average: it starts from round %d's state",
                    path, done)
        self.start_round = done + 1
        if "sim_time_s" in info:
            self.sim_time_s = float(info["sim_time_s"])
        source = Path(path)
        source = (source if source.is_dir() else source.parent) / "metrics.jsonl"
        self.history = completed_rounds(source, done)
        if self.accountant is not None:  # the privacy already spent carries over
            spent = [e["privacy"] for e in self.history if e.get("privacy")]
            self.accountant.restore(spent[-1] if spent else None)
        write_metrics(self.metrics_path, self.history)
        log(INFO, "fedge: resumed from %s after round %d", path, done)

    # -- evaluation -------------------------------------------------------------------
    @property
    def served_state(self) -> dict[str, np.ndarray]:
        """What the server evaluates, sends for evaluation and exports: the moving average of the
        global states (served-average > 0, after the first trained round), else the latest state."""
        return self.served if self.served is not None else self.state

    def evaluate_server(self) -> dict[str, dict[str, float]]:
        """Every task that is evaluated server-side (`TaskInfo.server_eval`), on the union of the
        fleet's held-out splits (a personalised task: its shared part alone, as for a new device)."""
        from federation.evaluation import held_out
        from federation.local import task_model

        results: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            if not get_task(task).info.server_eval:
                continue
            model = task_model(self.run, task)
            model.load_shared_state(task_slice(self.served_state, task))
            held = held_out(self.run.scenario, task, self.run.seed, self.run.seq_len, self.run.cache_dir)
            results[task] = finalize(task, get_task(task).evaluate_held_out(model, held.test, self.run))
        return results

    def personalised_tasks(self) -> tuple[str, ...]:
        """Tasks whose full model exists only on the devices: evaluated there every
        `federated-eval-every` rounds (`TaskInfo.personalised`)."""
        return tuple(t for t in self.tasks if get_task(t).info.personalised)

    def evaluate_federated(self, server_round: int, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """Held-out evaluation on the devices themselves (every checked-in node of `tasks`)."""
        messages = []
        for task in tasks:
            arrays = _record(task_slice(self.served_state, task))
            config = ConfigRecord({"server-round": server_round, "task": task})
            nodes = self.registry.of_task(task)
            cap = self.run.scenario.eval_devices
            if cap and len(nodes) > cap:  # a fixed, seeded panel of devices: comparable across rounds
                rng = np.random.default_rng(stable_seed("eval-panel", self.run.seed, task))
                nodes = [nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=cap, replace=False))]
            for node in nodes:
                content = RecordDict({"arrays": arrays, "config": config})
                messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
        sums: dict[str, dict[str, Any]] = {t: {} for t in tasks}
        for node, reply in send_and_stream(self.grid, messages, self.run.round_timeout):
            if reply.has_error():
                log(WARNING, "fedge: node %d failed evaluation: %s", node, reply.error.reason)
                continue
            metrics = dict(reply.content["metrics"])
            task = self.registry.nodes[node].task
            if int(metrics.pop("server-round", -1)) != server_round:
                log(WARNING, "fedge: node %d sent an evaluation for another round; left out", node)
                continue
            metrics.pop("num-examples", None)
            add_sums(sums[task], metrics)
        return {t: finalize(t, s) for t, s in sums.items() if s}

    # -- one round ----------------------------------------------------------------------
    def task_shapes(self, task: str) -> dict[str, tuple[int, ...]]:
        prefix = f"{task}/"
        return {k[len(prefix) :]: s for k, s in self.shapes.items() if k.startswith(prefix)}

    def task_record(self, task: str) -> ArrayRecord:
        return _record(task_slice(self.state, task))

    def candidates(self, server_round: int) -> list[int]:
        """The registered nodes considered this round: all, or a seeded pool of a large fleet
        (checked in lazily, so server memory follows the devices in flight, not the fleet)."""
        pool = self.run.scenario.candidate_pool
        if not pool:
            # a node that connected after the start (slow to boot, or restarted under a new
            # node id) checks in now and is drawn from this round on
            check_in(self.grid, self.registry, sorted(self.grid.get_node_ids()), self.run.round_timeout)
            return self.registry.ordered()
        nodes = sorted(self.grid.get_node_ids())
        rng = np.random.default_rng(stable_seed("candidates", self.run.seed, server_round))
        picked = [
            nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=min(pool, len(nodes)), replace=False))
        ]
        check_in(self.grid, self.registry, picked, self.run.round_timeout)
        # (which nodes form the pool is drawn by node id: they are not checked in yet)
        return self.registry.ordered(n for n in picked if n in self.registry.nodes)

    def upload_bytes(self, task: str) -> int:
        """What one device of `task` uploads: the masked vector packed to m bits per coordinate
        (m for a group of the round's devices of that task), or its float32 contribution."""
        from federation.rules import upload_size
        from federation.secagg.packing import packed_size
        from federation.secagg.protocol import required_modulus_bits
        from federation.secagg.vector import vector_length

        shapes = self.task_shapes(task)
        if self.run.secure_aggregation:
            scenario = self.run.scenario
            n = sum(k for c, k in scenario.per_round.items() if scenario.class_task(c) == task)
            if self.run.dp:  # the private vector: rotated values padded to a power of two, then weights
                from federation.privacy.encoding import plan_dp
                from federation.secagg.vector import dp_value_length

                run = self.run
                plan = plan_dp(run.dp_mechanism, run.dp_noise_multiplier, run.dp_clip, run.secagg_value_bits,
                               max(n, 2), dp_value_length(run.rule, shapes))  # fmt: skip
                return packed_size(vector_length(run.rule, shapes, dp=True), plan.modulus_bits)
            m = required_modulus_bits(self.run.secagg_value_bits, max(n, 2), self.run.task_max_weight(task))
            return packed_size(vector_length(self.run.rule, shapes), m)
        return 4 * upload_size(self.run.rule.layout(shapes))

    def choose(self, server_round: int) -> tuple[list[int], dict[str, Any]]:
        """The round's devices: by the simulated clock (eligibility, over-selection, deadline,
        dropouts) when `device-clock` is on, else a plain seeded draw per class."""
        nodes = self.candidates(server_round)
        if not self.run.device_clock:
            return sample(self.registry, self.run.scenario.per_round, self.run.seed, server_round, nodes), {}
        from federation.devices import default_catalogue
        from federation.schedule import Candidate, device_index, hour_of, plan_round

        catalogue = default_catalogue()
        download = {t: 4 * sum(int(np.prod(s)) for s in self.task_shapes(t).values()) for t in self.tasks}
        upload = {t: self.upload_bytes(t) for t in self.tasks}
        candidates = []
        for node in nodes:
            info = self.registry.nodes[node]
            candidates.append(
                Candidate(
                    node,
                    info.device_class,
                    catalogue[(info.device_class, info.tier)],
                    device_index(info.device_class, info.data_client),
                    download[info.task],
                    upload[info.task],
                    self.run.train_for(info.device_class).steps,
                    get_task(info.task).info.flops_per_example,
                )
            )
        start_hour = hour_of(self.sim_time_s)
        plan = plan_round(
            candidates,
            self.run.scenario.per_round,
            self.sim_time_s,
            self.run.seed,
            server_round,
            self.run.scenario.deadline_s,
        )
        clock = {"sim_time_s": self.sim_time_s, "sim_hour": start_hour, **plan.account.to_dict()}
        self.sim_time_s += plan.duration_s + self.run.scenario.round_interval_s
        return plan.kept, clock

    def train_round(self, server_round: int) -> RoundResult:
        """One training round, plain or secure; the only place the global state is updated."""
        start = time.perf_counter()
        chosen, clock = self.choose(server_round)
        if self.run.secure_round(server_round):
            from server.secagg import secure_train_round

            result = secure_train_round(self, server_round, chosen)
        else:
            result = self.plain_train_round(server_round, chosen)
        rule = self.run.rule
        self.advance(rule.update(self.state, rule.finalize(result.aggregate), 1.0))
        if self.accountant is not None:
            result.privacy = self.accountant.record_round(result.dp_releases)
        result.clock = clock or None
        result.train_wall_seconds = time.perf_counter() - start
        return result

    def plain_train_round(self, server_round: int, chosen: list[int]) -> RoundResult:
        """A round without secure aggregation: every device's upload reaches the server."""
        records = {t: _record(task_slice(self.state, t)) for t in self.tasks}
        messages, download = [], 0
        for node in chosen:
            task = self.registry.nodes[node].task
            config = ConfigRecord({"server-round": server_round, "task": task})
            messages.append(
                Message(
                    RecordDict({"arrays": records[task], "config": config}),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
            )
            download += records[task].count_bytes()
        rule = self.run.rule
        total = rule.init()
        participants: dict[str, int] = {}
        losses: dict[str, list[float]] = {}
        upload, failures, rejected, clipped = 0, 0, 0, 0
        for node, reply in send_and_stream(self.grid, messages, self.run.round_timeout):
            if reply.has_error():
                failures += 1
                log(WARNING, "fedge: node %d failed in round %d: %s", node, server_round, reply.error.reason)
                continue
            info = self.registry.nodes[node]
            reason = self._check_reply(reply, info.task, server_round)
            if reason:
                rejected += 1
                log(
                    WARNING,
                    "fedge: update from node %d (%s) left out of round %d: %s",
                    node,
                    info.device_class,
                    server_round,
                    reason,
                )
                continue
            metrics = reply.content["metrics"]
            update = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            if self.run.max_update_norm > 0:  # the server's norm bound (federation/rules/norm_bound.py)
                from federation.rules.norm_bound import clip_update

                bound = self.run.max_update_norm
                update, norm = clip_update(update, rule.layout(self.task_shapes(info.task)), bound)
                if norm > bound:
                    clipped += 1
                    log(WARNING, "fedge: update from node %d (%s) in round %d has L2 norm %.4g > "
                        "max-update-norm %g: clipped to it", node, info.device_class, server_round, norm,
                        bound)  # fmt: skip
            contrib = {f"{info.task}/{k}": v for k, v in update.items()}
            rule.add(total, contrib)
            upload += reply.content["arrays"].count_bytes()
            participants[info.device_class] = participants.get(info.device_class, 0) + 1
            losses.setdefault(info.task, []).append(float(metrics["train_loss"]))
            del contrib, reply  # folded into the running sum: memory does not grow with devices
        missing = len(chosen) - sum(participants.values()) - failures - rejected
        return RoundResult(
            secure=False,
            sampled=len(chosen),
            participants=participants,
            failures=failures + max(missing, 0),
            rejected=rejected,
            upload_bytes=upload,
            download_bytes=download,
            train_loss={t: float(np.mean(v)) for t, v in losses.items()},
            aggregate=total,
            clipped=clipped,
        )

    def _check_reply(self, reply: Message, task: str, server_round: int) -> str | None:
        content = reply.content
        if "arrays" not in content or "metrics" not in content:
            return "reply lacks arrays or metrics"
        metrics = content["metrics"]
        if metrics.get("server-round") != server_round:  # exact: 3.5 is not round 3
            return f"reply is for round {metrics.get('server-round')}, not {server_round}"
        expected = {k[len(task) + 1 :]: s for k, s in self.shapes.items() if k.startswith(f"{task}/")}
        try:
            update = {k: v.numpy() for k, v in content["arrays"].items()}
        except Exception as exc:  # a hostile or corrupt array payload
            return f"unreadable arrays ({exc})"
        return self.run.rule.check(update, expected, self.run.max_weight)

    def advance(self, updated: dict[str, np.ndarray]) -> None:
        """The round's new global state from the rule's update (through the server optimizer), and
        the served moving average with it: devices train from the latest state, the server
        evaluates and exports the average (served-average > 0)."""
        self.state = self.server_step(self.state, updated)
        if self.run.served_average > 0:
            self.served = served_update(self.served, self.state, self.run.served_average)

    # -- research methods (docs/methods.md): the server optimizer over the rule's update -----
    def server_step(
        self, before: dict[str, np.ndarray], after: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The new global state: the rule's update `after`, through the run's server optimizer
        (FedAvgM / FedAdam, `federation.rules.server_opt`; `none` at server-lr 1: `after` itself)."""
        opt = self.run.server_optimizer
        if opt.kind == "none" and opt.lr == 1.0:
            return after
        new, self.server_opt_state = server_opt_step(opt, before, after, self.server_opt_state)
        return new

    # -- outputs ------------------------------------------------------------------------
    def write(self, record: MetricsEntry) -> None:
        """Append one line to metrics.jsonl (serialised from `record`) and checkpoint the state."""
        entry = record.to_json()
        self.history.append(entry)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        save_checkpoint(
            self.out,
            {
                **self.state,
                **{STATE_PREFIX + k: v for k, v in self.server_opt_state.items()},
                **{SERVED_PREFIX + k: v for k, v in (self.served or {}).items()},
            },
            {
                "round": entry["round"],
                "scenario": self.run.scenario.name,
                "seed": self.run.seed,
                "lora_rank": self.run.lora.rank,
                "tasks": list(self.tasks),
                "sim_time_s": self.sim_time_s,  # the simulated clock, after this round
                "run_config": self.run_config,
                "rng": "stateless: every draw is seeded by (seed, round[, device])",
            },
        )

    def log_round(self, entry: dict[str, Any]) -> None:
        parts = []
        for task in self.tasks:
            source = entry.get("eval", {}).get(task) or entry.get("federated", {}).get(task)
            if source:
                parts.append(f"{task} {PRIMARY_METRIC[task]}={source[PRIMARY_METRIC[task]]:.4f}")
        log(
            INFO,
            "fedge round %d/%d done in %.1fs: %s",
            entry["round"],
            self.run.rounds,
            entry["wall_seconds"],
            ", ".join(parts),
        )


def run_federation(grid: Grid, run_config: Mapping[str, Any], run_id: int = 0) -> Path:
    run = RunConfig.parse(run_config)
    fed = RunState(grid, run, run_id, run_config)
    if not run.secure_aggregation:
        log(WARNING, "fedge: secure-aggregation = false: the server sees every device's individual update")
    elif run.secagg_pki:  # fail at start, not in round 1, when the CA's public key is missing
        from federation.secagg.pki import CertificateError, load_ca_public

        try:
            load_ca_public(run.secagg_pki)
        except CertificateError as exc:
            raise FedgeError(f"run config secagg-pki: {exc}") from None
        log(INFO, "fedge: secure aggregation with certified device keys (CA in %s)", run.secagg_pki)
    log(INFO, "fedge: scenario %s, %d rounds, output %s", run.scenario.name, run.rounds, fed.out)
    # Warm the data caches here, once, before devices ask for them concurrently.
    for task in fed.tasks:
        if get_task(task).info.server_eval:
            from federation.evaluation import held_out

            held_out(run.scenario, task, run.seed, run.seq_len, run.cache_dir)
    write_status(fed.out, WAITING, devices_wanted=run.scenario.size)
    nodes = _wait_for_nodes(grid, run.scenario.size)
    if run.scenario.candidate_pool:
        fed.candidates(0)  # a large fleet checks in lazily: a first seeded pool only
    else:
        check_in(grid, fed.registry, nodes, run.round_timeout)
    counts = {c: len(fed.registry.of_class(c)) for c in run.scenario.fleet}
    log(INFO, "fedge: %d devices checked in: %s", len(fed.registry.nodes), counts)
    write_status(fed.out, CHECKED_IN, devices=counts, start_round=fed.start_round)
    last = run.rounds
    if fed.start_round == 1:
        start = time.perf_counter()
        evaluated = fed.evaluate_server()
        personalised = fed.personalised_tasks() if run.federated_eval_every >= 0 else ()
        federated = fed.evaluate_federated(0, personalised)
        fed.write(MetricsEntry(0, evaluated, federated, time.perf_counter() - start, devices=counts))
        fed.log_round(fed.history[-1])
    for server_round in range(fed.start_round, last + 1):
        start = time.perf_counter()
        result = fed.train_round(server_round)
        evaluated = fed.evaluate_server()
        every = run.federated_eval_every
        federated: dict[str, dict[str, float]] = {}
        if server_round == last and every >= 0:
            federated = fed.evaluate_federated(server_round, fed.tasks)
        elif every > 0 and server_round % every == 0 and fed.personalised_tasks():
            federated = fed.evaluate_federated(server_round, fed.personalised_tasks())
        fed.write(MetricsEntry(server_round, evaluated, federated, time.perf_counter() - start, train=result))
        fed.log_round(fed.history[-1])
    from server.report import write_report

    write_report(fed)
    write_status(fed.out, DONE, rounds=last)
    log(INFO, "fedge: results in %s", fed.out)
    return fed.out
