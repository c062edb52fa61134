"""Task heads and their target conventions (Echo-Vision-FM's fine-tuning table).

| task | target seen by the loss | loss | outputs |
| ef | EF / 100 | MSE | 1 |
| esv, edv | log(volume mL) (reported after exp) | MSE | 1 |
| ef_class | 1 if EF >= threshold | BCE with logits | 1 |
| as_class | grade 0-4 | cross-entropy | 5 |

A regression head can carry its targets' federated statistics (`[finetune].target_stats`): two fixed
buffers, the shift (mean) and scale (spread) of the encoded target, with which the model de-standardises the
head's output (`Heads.output`: raw * scale + shift), so the head's layers learn standardised targets and its
last layer starts at bias 0, the federation's mean, whatever each site's own label mix. The buffers are not
trained (no gradient reaches them), travel with the model and live in its checkpoints; a head without
statistics has shift 0 and scale 1 (the identity), and a checkpoint written before they existed loads as such
(`is_stat_key`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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

    def loss(
        self, output: torch.Tensor, target: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The loss of a head's (de-standardised) output; a regression head's in its standardised units when it has
        target statistics (`stats`: shift and scale, `Heads.stats`), so that they set the loss's scale, not each
        site's label mix."""
        y = self.encode(target)
        if self.kind == "regression":
            out, y = output.squeeze(-1).float(), y.float()
            if stats is not None:  # one output: (B,) against shift and scale of shape (1,)
                shift, scale = stats
                out, y = (out - shift) / scale, (y - shift) / scale
            return nn.functional.mse_loss(out, y)
        if self.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(output.squeeze(-1).float(), y.float())
        return nn.functional.cross_entropy(output.float(), y.long())

    def init_bias(self) -> float:
        """A sensible starting output (population mean) so training starts near the baseline."""
        return {"ef": 0.55, "esv": math.log(50.0), "edv": math.log(110.0)}.get(self.name, 0.0)

    def reference(self) -> tuple[float, float]:
        """A regression target's rough population centre and spread in encoded units (EchoNet-Dynamic's: EF 55 +-
        12 %, log ESV and log EDV +- 0.6 and 0.4). Fixed in the code, never taken from data: the federated
        statistics are computed around the centre (numerically safer sums), and under differential privacy each
        video's target is clipped to a few spreads around it (`fedecho.fl.statistics`)."""
        return self.init_bias(), {"ef": 0.12, "esv": 0.6, "edv": 0.4}.get(self.name, 1.0)


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
    # VideoMAE's fine-tuning head init: truncated normal (std 0.02) scaled by 0.001. The output starts at the bias
    # (the population mean), and yet the first step's gradient reaches every layer below: with a zero weight
    # only the head would move in a site's first local step, so a site with one step per round would send an
    # update a hundred times smaller than its peers' (and the round's norm check would reject theirs).
    nn.init.trunc_normal_(last.weight, std=0.02)
    with torch.no_grad():
        last.weight.mul_(1e-3)
    nn.init.constant_(last.bias, task.init_bias())
    return head


SHIFT, SCALE = "_target_shift", "_target_scale"  # suffixes of a regression head's statistics (buffers of Heads)


def is_stat_key(key: str) -> bool:
    """A state-dict key of a head's target statistics: optional in a checkpoint (absent: the identity)."""
    return key.startswith("heads.") and key.count(".") == 1 and key.endswith((SHIFT, SCALE))


class Heads(nn.ModuleDict):
    """The task heads by task name, and each regression head's target statistics as buffers of this container,
    `<task>_target_shift` and `<task>_target_scale` (state-dict keys `heads.ef_target_shift`, ...): a layer with
    trainable weights must hold no buffer for Opacus' per-sample gradients, and the container holds no weight."""

    def __init__(
        self, in_dim: int, tasks: Iterable[str], kind: Literal["linear", "mlp"], norm: Literal["batch", "group"]
    ):
        tasks = tuple(tasks)
        super().__init__({name: make_head(in_dim, get_task(name), kind, norm) for name in tasks})
        for name in tasks:
            task = get_task(name)
            if task.kind == "regression":  # the identity until the federation's statistics are set
                self.register_buffer(name + SHIFT, torch.zeros(task.outputs))
                self.register_buffer(name + SCALE, torch.ones(task.outputs))

    def stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(shift, scale) of a regression head; None for a head without them (classification)."""
        shift, scale = getattr(self, name + SHIFT, None), getattr(self, name + SCALE, None)
        if not isinstance(shift, torch.Tensor) or not isinstance(scale, torch.Tensor):
            return None
        return shift, scale

    def output(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Head `name`'s output in encoded target units: its layers' output de-standardised by its statistics."""
        out = self[name](z)
        stats = self.stats(name)
        return out if stats is None else out * stats[1] + stats[0]

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.output(name, z) for name in self.keys()}

    @torch.no_grad()
    def set_stats(self, name: str, mean: torch.Tensor | float, std: torch.Tensor | float) -> None:
        """Fix a regression head's target statistics; its last layer's bias becomes 0: it starts at the mean."""
        stats = self.stats(name)
        if stats is None:
            raise ValueError(f"head {name} has no target statistics (a classification head)")
        shift, scale = stats
        shift.copy_(torch.as_tensor(mean, dtype=shift.dtype).expand_as(shift))
        scale.copy_(torch.as_tensor(std, dtype=scale.dtype).expand_as(scale))
        if not (scale > 0).all():
            raise ValueError(f"head {name}: target spread must be > 0, not {scale.tolist()}")
        last_linear(self[name]).bias.zero_()


def last_linear(head: nn.Module) -> nn.Linear:
    """The head's last layer (the linear head itself, or the MLP's output layer): what a ridge refit sets."""
    last = head if isinstance(head, nn.Linear) else list(head.children())[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError(f"the head's last layer is a {type(last).__name__}, not a Linear")
    return last
