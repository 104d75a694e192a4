"""End-of-run outputs: summary.json (initial vs final vs baselines), the PEFT adapter, plots."""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.common.logger import log

from federation.metrics import PRIMARY_METRIC
from federation.model.edge import task_slice
from federation.tasks import get_task

if TYPE_CHECKING:
    from server.loop import RunState


def _metric_at(entry: dict[str, Any], task: str) -> tuple[float | None, str]:
    """The task's primary metric in a metrics.jsonl entry: server-side if any, else federated."""
    name = PRIMARY_METRIC[task]
    for source in ("eval", "federated"):
        value = entry.get(source, {}).get(task, {}).get(name)
        if value is not None:
            return float(value), "server" if source == "eval" else "federated"
    return None, ""


def baselines(fed: RunState, task: str) -> dict[str, dict[str, float]]:
    """The task's simple baselines on the same held-out data the model is scored on."""
    from federation.evaluation import fleet_devices, held_out
    from federation.fleet import load_device_data

    run = fed.run
    devices = fleet_devices(run.scenario, task, run.seed, run.cache_dir)
    data = [load_device_data(d, run.seed, run.seq_len, run.cache_dir) for d in devices]
    test = held_out(run.scenario, task, run.seed, run.seq_len, run.cache_dir).test
    return get_task(task).baselines(data, test)


def export_adapters(fed: RunState, directory: Path) -> None:
    """adapter/<task>/: PEFT adapter (save_pretrained) + head.safetensors of the served final state."""
    from safetensors.numpy import save_file

    from federation.local import task_model

    for task in fed.tasks:
        model = task_model(fed.run, task)
        shared = task_slice(fed.served_state, task)  # the served model (its moving average, if kept)
        model.load_shared_state(shared)
        target = directory / task
        model.export_adapter(target)
        head = {k.removeprefix("head."): v for k, v in shared.items() if k.startswith("head.")}
        save_file(head, str(target / "head.safetensors"))


def plot(fed: RunState, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for task in fed.tasks:
        name = PRIMARY_METRIC[task]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for source, style in (("eval", "o-"), ("federated", "s--")):
            points = [(e["round"], e[source][task][name]) for e in fed.history if task in e.get(source, {})]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label="server-side" if source == "eval" else "on devices")
        ax.set_xlabel("round")
        ax.set_ylabel(f"held-out {name}")
        ax.set_title(f"{task} ({fed.run.scenario.name})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / f"{task}.png", dpi=110)
        plt.close(fig)
    clocked = [e for e in fed.history if "clock" in e]
    if clocked:
        plot_clock(fed, clocked, directory, plt)


def plot_clock(fed: RunState, clocked: list[dict[str, Any]], directory: Path, plt: Any) -> None:
    """Participation per device class, and each class's task metric, over simulated time."""
    hours = [e["clock"]["sim_time_s"] / 3600.0 for e in clocked]
    classes = sorted({c for e in clocked for c in e["clock"]["per_class"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for device_class in classes:
        for field, style in (("eligible", ":"), ("sampled", "--"), ("finished", "-")):
            ys = [e["clock"]["per_class"].get(device_class, {}).get(field, 0) for e in clocked]
            axes[0].plot(hours, ys, style, label=f"{device_class} {field}")
        task = fed.run.scenario.class_task(device_class)
        name = PRIMARY_METRIC[task]
        points = [
            (
                e["clock"]["sim_time_s"] / 3600.0,
                (e.get("eval", {}).get(task) or e.get("federated", {}).get(task))[name],
            )
            for e in clocked
            if e.get("eval", {}).get(task) or e.get("federated", {}).get(task)
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            axes[1].plot(xs, ys, "o-", label=f"{device_class}: {task} {name}")
    axes[0].set_title(f"participation per class ({fed.run.scenario.name})")
    axes[1].set_title("held-out metric per class")
    for ax in axes:
        ax.set_xlabel("simulated time (hours since midnight of day 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(directory / "participation.png", dpi=110)
    plt.close(fig)


def write_report(fed: RunState) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    first = next((e for e in fed.history if e["round"] == 0), fed.history[0] if fed.history else {})
    last = fed.history[-1] if fed.history else {}
    for task in fed.tasks:
        initial, source = _metric_at(first, task)
        final, final_source = _metric_at(last, task)
        info = get_task(task).info
        tasks[task] = {
            "metric": PRIMARY_METRIC[task],
            "personalised": info.personalised,  # a private part on each device (TaskInfo)
            "device_baselines": list(info.device_baselines),  # compare with the on-device metric only
            "evaluated": final_source or source,
            "initial": initial,
            "final": final,
            "final_metrics": last.get("eval", {}).get(task) or last.get("federated", {}).get(task, {}),
            "final_on_devices": last.get("federated", {}).get(task, {}),
            "on_devices": {
                "initial": first.get("federated", {}).get(task, {}).get(PRIMARY_METRIC[task]),
                "final": last.get("federated", {}).get(task, {}).get(PRIMARY_METRIC[task]),
            },
            "baselines": baselines(fed, task),
        }
    summary = {
        "scenario": fed.run.scenario.name,
        "rounds": fed.run.rounds,
        "seed": fed.run.seed,
        "fleet": fed.run.scenario.fleet,
        "fleet_tiers": fed.run.scenario.tiers,  # per class/tier: the tier sets a device's LoRA rank
        "lora": {
            "rank": fed.run.lora.rank,
            "alpha": fed.run.lora.alpha,
            "targets": list(fed.run.lora.targets),
        },
        "tasks": tasks,
        "wall_seconds": sum(e.get("wall_seconds", 0.0) for e in fed.history),
        "upload_bytes": sum(e.get("upload_bytes", 0) for e in fed.history),
        "download_bytes": sum(e.get("download_bytes", 0) for e in fed.history),
    }
    private = [e["privacy"] for e in fed.history if e.get("privacy")]
    if private:  # distributed DP: what the run spent (docs/privacy.md)
        keys = ("epsilon", "delta", "noise_multiplier", "mechanism")
        summary["privacy"] = {k: private[-1][k] for k in keys}
        summary["privacy"]["max_wrap_probability"] = max(p["wrap_probability"] for p in private)
        summary["privacy"]["clip"] = fed.run.dp_clip
    (fed.out / "summary.json").write_text(json.dumps(summary, indent=2))
    export_adapters(fed, fed.out / "adapter")
    plot(fed, fed.out / "plots")
    log(INFO, "fedge summary: %s", json.dumps({t: [v["initial"], v["final"]] for t, v in tasks.items()}))
    return summary
