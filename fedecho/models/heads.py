"""Task heads and their target conventions (Echo-Vision-FM's fine-tuning table).

| task | target seen by the loss | loss | outputs |
| ef | EF / 100 | MSE | 1 |
| esv, edv | log(volume mL) (reported after exp) | MSE | 1 |
| ef_class | 1 if EF >= threshold | BCE with logits | 1 |
| as_class | grade 0-4 | cross-entropy | 5 |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["regression", "binary", "multiclass"]
    outputs: int

    def encode(self, target: torch.Tensor) -> torch.Tensor:
        """Dataset target (EF %, mL, class) -> what the loss compares with."""
        if self.name == "ef":
            return target / 100.0
        if self.name in ("esv", "edv"):
            return torch.log(target.clamp_min(1e-3))
        return target

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """Head output -> prediction in dataset units (EF %, mL, probability, class probabilities)."""
        if self.name == "ef":
            return output.squeeze(-1) * 100.0
        if self.name in ("esv", "edv"):
            return torch.exp(output.squeeze(-1))
        if self.kind == "binary":
            return torch.sigmoid(output.squeeze(-1))
        return torch.softmax(output, dim=-1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = self.encode(target)
        if self.kind == "regression":
            return nn.functional.mse_loss(output.squeeze(-1).float(), y.float())
        if self.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(output.squeeze(-1).float(), y.float())
        return nn.functional.cross_entropy(output.float(), y.long())

    def init_bias(self) -> float:
        """A sensible starting output (population mean) so training starts near the baseline."""
        return {"ef": 0.55, "esv": math.log(50.0), "edv": math.log(110.0)}.get(self.name, 0.0)


TASKS: dict[str, Task] = {
    "ef": Task("ef", "regression", 1),
    "esv": Task("esv", "regression", 1),
    "edv": Task("edv", "regression", 1),
    "ef_class": Task("ef_class", "binary", 1),
    "as_class": Task("as_class", "multiclass", 5),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def make_head(
    in_dim: int, task: Task, kind: Literal["linear", "mlp"], norm: Literal["batch", "group"] = "batch"
) -> nn.Module:
    """Linear(in->out), or the paper's MLP 200-BN-ReLU-100-BN-ReLU-out (norm "group": GroupNorm, for DP-SGD)."""
    if kind == "linear":
        head = nn.Linear(in_dim, task.outputs)
        last = head
    else:
        last = nn.Linear(100, task.outputs)

        def nrm(c: int) -> nn.Module:
            return nn.BatchNorm1d(c) if norm == "batch" else nn.GroupNorm(math.gcd(32, c), c)

        inplace = norm == "batch"  # Opacus' backward hooks forbid editing a hooked layer's output in place
        head = nn.Sequential(
            nn.Linear(in_dim, 200), nrm(200), nn.ReLU(inplace=inplace),
            nn.Linear(200, 100), nrm(100), nn.ReLU(inplace=inplace),
            last,
        )  # fmt: skip
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, task.init_bias())
    return head
