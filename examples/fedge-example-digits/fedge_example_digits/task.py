"""The `digits` task: handwritten digit recognition on an e-ink notepad, as a fedge plug-in.

Everything fedge needs is here, through fedge's public task interface (`federation.tasks.Task`):
- model: a small encoder (two dense layers, 64 -> 64 -> 32) pretrained on the "vendor lab"
  images no writer holds and shipped frozen (`encoder.json`), LoRA on both layers (the shared
  frozen A comes from fedge, so mixed ranks and secure aggregation work as for fedge's tasks),
  and a linear head;
- data: `fedge_example_digits.data` (writers of scikit-learn's digits);
- local training and evaluation: fedge's classifier helpers (`federation.training`);
- metrics: accuracy (primary) and macro-F1 from summed confusion cells;
- baselines: the majority digit, and a nearest-centroid classifier fit centrally on every
  writer's training images (a model that sees all the data, which federation never does).

Rebuild the shipped encoder with `python -m fedge_example_digits.task` (deterministic).
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.metrics import macro_f1_from_confusion
from federation.model.edge import TaskModel, seeded_init
from federation.model.lora import LoraSettings, wrap_with_lora
from federation.tasks import Sums, Task, TaskInfo
from federation.training import TrainResult, TrainSettings, eval_classifier, train_classifier
from fedge_example_digits.data import N_CLASSES, digits_clients, load_digits_client, vendor_lab

ENCODER_FILE = Path(__file__).with_name("encoder.json")
FEATURES = 32
LORA_TARGETS = ("fc1", "fc2")


class DigitsEncoder(nn.Module):
    """[B, 64] pixels in [0, 1] -> [B, 32] features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, FEATURES)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


@functools.lru_cache(maxsize=1)
def _shipped_state() -> dict[str, torch.Tensor]:
    if not ENCODER_FILE.exists():
        raise FedgeError(f"{ENCODER_FILE} is missing: run `python -m fedge_example_digits.task`")
    raw = json.loads(ENCODER_FILE.read_text())
    return {k: torch.from_numpy(_decode(v["data"]).reshape(v["shape"])) for k, v in raw["tensors"].items()}


def _decode(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4").copy()


def _encode(value: torch.Tensor) -> str:
    return base64.b64encode(value.detach().numpy().astype("<f4").tobytes()).decode()


def load_encoder() -> DigitsEncoder:
    """A fresh frozen copy of the shipped encoder (peft wraps the copy it is given)."""
    encoder = DigitsEncoder()
    encoder.load_state_dict(_shipped_state())
    encoder.requires_grad_(False)
    return encoder.eval()


def pretrain_encoder(epochs: int = 300, seed: int = 0) -> dict[str, float]:
    """Train the encoder (+ a throw-away head) on the vendor-lab images; write `encoder.json`."""
    torch.manual_seed(seed)
    x, y = vendor_lab()
    encoder, head = DigitsEncoder(), nn.Linear(FEATURES, N_CLASSES)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(encoder(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = {
        k: {"shape": list(v.shape), "data": _encode(v)} for k, v in encoder.state_dict().items()
    }
    with torch.no_grad():
        accuracy = float((head(encoder(x)).argmax(-1) == y).float().mean())
    ENCODER_FILE.write_text(json.dumps({"format": "fedge-example-digits/1", "tensors": tensors}))
    return {"vendor_lab_images": len(y), "train_loss": float(loss.detach()), "train_accuracy": accuracy}


class DigitsModel(TaskModel):
    """Pretrained encoder + LoRA, linear head."""

    task = "digits"

    def __init__(self, lora: LoraSettings, seed: int, rank: int) -> None:
        super().__init__()
        settings = LoraSettings(rank=lora.rank, alpha=lora.alpha, targets=LORA_TARGETS)
        self.backbone = wrap_with_lora(load_encoder(), settings, seed, self.task, rank)
        self._init_rank(settings, seed, rank)
        self.head = nn.ModuleDict({"out": nn.Linear(FEATURES, N_CLASSES)})
        seeded_init(self.head, seed, "digits-head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head["out"](self.backbone(x))


class DigitsTask(Task):
    info = TaskInfo(
        name="digits",
        description="handwritten digit recognition (scikit-learn digits), one device per writer",
        metrics=("accuracy", "macro_f1"),
        primary_metric="accuracy",
        # 64*64 + 64*32 + 32*10 multiply-adds forward, x2 FLOPs, x3 for forward + backward
        flops_per_example=3 * 2 * (64 * 64 + 64 * 32 + 32 * 10),
    )

    def clients(self, cache: Path | None) -> Sequence[str]:
        return digits_clients()

    def load_client(self, client_id: str, seed: int, *, seq_len: int, cache: Path | None) -> Any:
        return load_digits_client(client_id, seed)

    def build_model(self, lora: LoraSettings, seed: int, rank: int, run: RunConfig | None) -> TaskModel:
        return DigitsModel(lora, seed, rank)

    def train(
        self,
        model: TaskModel,
        data: Any,
        settings: TrainSettings,
        seed: int,
        *,
        client_id: str,
        run: RunConfig,
        private: np.ndarray | None,
    ) -> tuple[TrainResult, np.ndarray | None]:
        return train_classifier(model, data.train_x, data.train_y, settings, seed), None

    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
        return eval_classifier(model, data.test_x, data.test_y, N_CLASSES)

    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        return torch.cat([d.test_x for d in data]), torch.cat([d.test_y for d in data])

    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        return eval_classifier(model, held[0], held[1], N_CLASSES)

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        return {
            "accuracy": float(sums["correct"]) / float(sums["count"]),
            "macro_f1": macro_f1_from_confusion(sums["confusion"], N_CLASSES),
        }

    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        from federation.data.baselines import macro_f1

        train_x = torch.cat([d.train_x for d in data])
        train_y = torch.cat([d.train_y for d in data])
        test_x, test_y = held
        majority = torch.full_like(test_y, int(torch.bincount(train_y, minlength=N_CLASSES).argmax()))
        present = [c for c in range(N_CLASSES) if (train_y == c).any()]
        centroids = torch.stack([train_x[train_y == c].mean(0) for c in present])
        nearest = torch.tensor(present)[torch.cdist(test_x, centroids).argmin(-1)]
        return {
            name: {
                "accuracy": float((pred == test_y).float().mean()),
                "macro_f1": macro_f1(pred, test_y, N_CLASSES),
            }
            for name, pred in (("majority", majority), ("nearest-centroid", nearest))
        }


TASK = DigitsTask()


if __name__ == "__main__":
    print(pretrain_encoder())
