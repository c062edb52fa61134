"""A training run's local work as one job: the same code on one device and on each of a site's several.

`TrainingJob` holds everything a Trainer needs (the model, its phase settings, the training set, the loader's seed,
where it resumes, a DP-SGD plan) and pickles, so `fedecho.train.parallel.launch` can hand it to every rank; on one
device it simply runs here. `fedecho train` (`fedecho.train.run`) and a site's federated round
(`fedecho.client.local`) both train through it, adding their own concerns as picklable hooks: `setup` (FedProx,
SCAFFOLD, a kept optimiser) on every rank, `after_epoch` (evaluate, checkpoint) on rank 0 while the others wait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedecho.models import EchoVisionFM
from fedecho.privacy.dp_policy import DPPlan
from fedecho.train.config import PhaseSection
from fedecho.train.engine import EpochResult, Phase, Trainer, pick_device
from fedecho.train.loader import loader_workers, train_batches
from fedecho.train.parallel import Group, launch


@dataclass
class JobResult:
    """What rank 0 hands back: the trained weights (on the CPU) and what the training did."""

    state: dict[str, torch.Tensor]
    epochs: list[EpochResult] = field(default_factory=list)
    updates: int = 0  # optimiser steps taken
    optimizer: dict[Any, Any] = field(default_factory=dict)  # the optimiser's per-parameter state (moments)
    trainer: dict[str, Any] = field(default_factory=dict)  # Trainer.state_dict(), to resume from

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.epochs)

    @property
    def examples(self) -> int:
        return sum(r.examples for r in self.epochs)

    @property
    def loss(self) -> float:
        """The mean training loss over every step."""
        return sum(r.loss * r.steps for r in self.epochs) / max(self.steps, 1)


@dataclass
class TrainingJob:
    """Train `model` for the phase's epochs (or `steps` steps) from `trainer_state` on; see the module docstring."""

    model: EchoVisionFM
    phase: Phase
    cfg: PhaseSection
    dataset: Any  # the training EchoVideoDataset, decoded into its cache already
    seed: int  # the loader's: global batches are drawn from (seed, epoch)
    workers: int | str = 0  # DataLoader workers, or "auto" (`fedecho.train.loader.loader_workers`)
    device: str | None = None  # one device: this one (None: CUDA when available); several: each rank's own
    steps: int = 0  # > 0: this many steps, over as many epochs as they take, instead of cfg.epochs epochs
    trainer_state: dict[str, Any] | None = None  # resume: Trainer.state_dict() of an earlier run
    plan: DPPlan | None = None  # DP-SGD: one epoch of the plan's Poisson-sampled steps
    dp_seed: int = 0  # the round's secret seed for DP-SGD's sampling and noise (the same on every rank)
    setup: Callable[[Trainer], None] | None = None  # on every rank, before the first step
    after_epoch: Callable[[Trainer, EpochResult], None] | None = None  # on rank 0 after each epoch
    progress: bool = False

    def __call__(self, group: Group) -> JobResult:
        device = torch.device(group.device) if group.distributed else pick_device(self.device)
        steps_per_epoch = (len(self.dataset) + self.cfg.batch_size - 1) // self.cfg.batch_size
        trainer = Trainer(self.model, self.phase, self.cfg, steps_per_epoch, device, group)
        if self.trainer_state is not None:
            trainer.load_state_dict(self.trainer_state)
        if self.setup is not None:
            self.setup(trainer)
        workers = loader_workers(self.workers, device, group)
        progress = self.progress and group.main
        epochs: list[EpochResult] = []
        if self.plan is not None:
            from fedecho.train.dp import private_epoch  # Opacus loads only where DP is used

            epochs.append(private_epoch(trainer, self.dataset, self.plan, self.dp_seed, workers))
            self._after(trainer, epochs[-1], group)
        else:
            batches = train_batches(self.dataset, self.cfg.batch_size, self.seed, group, workers, str(device))
            done = 0
            while (self.steps and done < self.steps) or (not self.steps and trainer.epoch < self.cfg.epochs):
                left = self.steps - done if self.steps else None
                epochs.append(trainer.train_epoch(batches.epoch(trainer.epoch), progress=progress, max_steps=left))
                done += epochs[-1].steps
                self._after(trainer, epochs[-1], group)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if group.main else {}
        return JobResult(
            state, epochs, trainer.updates, trainer.optimizer.state_dict()["state"] if group.main else {},
            trainer.state_dict() if group.main else {},
        )  # fmt: skip

    def _after(self, trainer: Trainer, result: EpochResult, group: Group) -> None:
        if self.after_epoch is not None:
            if group.main:
                self.after_epoch(trainer, result)
            group.barrier()

    def run(self, devices: int = 1) -> JobResult:
        """Here on one device, or on `devices` ranks of the job's device type."""
        kind = pick_device(self.device).type
        return launch(self, devices, kind)


__all__ = ["JobResult", "TrainingJob"]
