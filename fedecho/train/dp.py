"""DP-SGD at the site (Opacus): per-sample clipping and Gaussian noise on every local step.

The privacy unit is a patient wherever the data has patient ids (`fedecho.privacy.dp_policy.unit_in_force`):
patients are sampled, and the gradients of all of a patient's videos in a batch are averaged into one
per-patient gradient before it is clipped, so one patient's presence changes what a round releases by at
most (epsilon, delta). Where the unit is a video (no patient ids, or the site's `unit = "video"`), each
step Poisson-samples every video independently with rate q = batch_size / videos, and a patient with k
videos is protected only by group privacy (roughly k times epsilon, worse in delta).

How a round becomes private: `plan_round` decides noise, clipping, sample rate and steps from the site's
policy, the run file and the data index; `reserve_round` reserves the round's privacy cost in the site's
ledger (`fedecho.privacy.ledger`) before any video is decoded; `PrivateTraining` then attaches Opacus
(`GradSampleModule` hooks on the model, `DPOptimizer` around the Trainer's own optimizer) and a Poisson
loader to an unchanged `Trainer`.
Sampling and noise draw from the operating system's entropy, never from the run's seed: the server
knows that seed, and noise it could regenerate would protect nothing (so DP rounds are not bitwise
reproducible).

On several devices (`fedecho.train.parallel`) every rank draws the same Poisson batches from one secret seed the
site drew, and trains on its share of the sampled units (a unit's videos stay on one rank); each rank clips its
units' gradients, rank 0 alone adds the noise, and Opacus' distributed optimizer sums and averages them: the
step is the one-device step on the global batch, so the ledger accounts the global batch and sample rate.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedecho.privacy.dp_policy import DPPlan, PrivacyRefused
from fedecho.train.engine import EpochResult, Trainer
from fedecho.train.loader import GlobalBatch, TrainBatches

# The tubelet embedding's input (the video) needs no gradient; Opacus' hooks still see its output's: harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to")


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Trainable layers that DP-SGD cannot train (BatchNorm mixes samples), as Opacus' validator sees them."""
    return [str(e) for e in ModuleValidator.validate(model, strict=False)]


def check_private_model(model: nn.Module) -> None:
    """Fail clearly before any training when the model cannot be trained with DP-SGD."""
    problems = batchnorm_layers(model)
    if problems:
        raise PrivacyRefused(
            "DP-SGD cannot train this model: " + "; ".join(problems[:3])
            + ' (set [model] stf_norm = "group" in the run file: GroupNorm in STF-Net and the MLP head)'
        )  # fmt: skip


def secret_seed() -> int:
    """A seed from the operating system's entropy, for a round's sampling and noise (never the run's seed)."""
    return secrets.randbits(62)


def poisson(plan: DPPlan, seed: int) -> Callable[[int], list[GlobalBatch]]:
    """`plan.steps` global batches, each unit in with probability q independently (Opacus' analysis assumes this);
    a batch is its sampled units, so a unit's videos go to one rank together."""

    def draw(epoch: int) -> list[GlobalBatch]:
        gen = torch.Generator().manual_seed(seed + epoch)
        n = len(plan.units)
        batches: list[GlobalBatch] = []
        for _ in range(plan.steps):
            chosen = torch.nonzero(torch.rand(n, generator=gen) < plan.sample_rate).flatten().tolist()
            batches.append([plan.units[u] for u in chosen])
        return batches

    return draw


class _PerUnit:
    """Per-sample gradients first averaged per privacy unit (patient-level DP), before Opacus clips them."""

    unit_of: torch.Tensor | None = None  # training-set index -> unit number (None: a unit is a video)
    batch_index: torch.Tensor | None = None  # training-set indices of the current batch

    def clip_and_accumulate(self) -> None:
        if self.unit_of is not None and self.batch_index is not None and len(self.batch_index):
            _, units = torch.unique(self.unit_of[self.batch_index], return_inverse=True)
            counts = torch.bincount(units).float()
            for p in self.params:
                g = self._get_flat_grad_sample(p)
                u = units.to(g.device)
                per_unit = g.new_zeros((len(counts), *g.shape[1:])).index_add_(0, u, g)
                p.grad_sample = per_unit / counts.to(g.device).view(-1, *([1] * (g.ndim - 1)))
        super().clip_and_accumulate()  # type: ignore[misc]


class _UnitDPOptimizer(_PerUnit, DPOptimizer):  # type: ignore[misc]
    """One device."""


class _DistributedUnitDPOptimizer(_PerUnit, DistributedDPOptimizer):  # type: ignore[misc]
    """Several devices: each rank clips its units, rank 0 adds the noise, the sum is averaged over the ranks."""


class PrivateTraining:
    """Makes a Trainer's steps DP-SGD steps; use as a context manager around the round's training.

    The Trainer itself is unchanged: Opacus' hooks sit on the model's layers (so `Trainer.loss` still calls
    `model.forward_pretrain` / `model(...)`), the Trainer's optimizer is wrapped, and the regulariser (FedProx's
    proximal term, data-independent) is added to the privatised gradient instead of to the per-sample loss.
    In pre-training the decoder's mask token stays fixed: Opacus computes per-sample gradients layer by
    layer and a bare parameter belongs to no layer.
    """

    def __init__(self, trainer: Trainer, plan: DPPlan, seed: int | None = None):
        """seed: the round's secret seed for sampling and noise (the same on every rank; default: drawn here)."""
        if trainer.cfg.accumulate != 1:
            raise PrivacyRefused("DP-SGD does not combine with gradient accumulation (set accumulate = 1)")
        check_private_model(trainer.model)
        self.trainer, self.plan = trainer, plan
        self.seed = secret_seed() if seed is None else seed
        model = trainer.model
        decoder = getattr(model, "decoder", None)
        if decoder is not None and isinstance(getattr(decoder, "mask_token", None), nn.Parameter):
            decoder.mask_token.requires_grad_(False)
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        world = trainer.group.world
        optimizer = _DistributedUnitDPOptimizer if trainer.group.distributed else _UnitDPOptimizer
        # The noise is drawn on the parameters' device (a CPU generator cannot draw CUDA tensors).
        noise = torch.Generator(device=trainer.device).manual_seed(self.seed + 1)
        self.optimizer = optimizer(
            trainer.optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.batch_size / world,  # each rank's share; the sum is averaged over the ranks
            loss_reduction="mean",
            generator=noise,
        )
        if plan.unit == "patient":
            unit_of = torch.empty(sum(len(u) for u in plan.units), dtype=torch.long)
            for k, u in enumerate(plan.units):
                unit_of[list(u)] = k
            self.optimizer.unit_of = unit_of
        self._saved: dict[str, Any] = {}

    def loader(self, dataset: Any, workers: int = 0) -> Any:
        """The round's Poisson-sampled batches, this rank's share of each (exactly plan.steps, some possibly empty)."""
        t = self.trainer
        batches = TrainBatches(
            dataset, poisson(self.plan, self.seed), self.plan.steps, group=t.group, workers=workers,
            pin_memory=t.device.type == "cuda", pad=False,
        )  # fmt: skip
        return batches.epoch(0)

    def __enter__(self) -> PrivateTraining:
        t = self.trainer
        self._saved = {"optimizer": t.optimizer, "regularizer": t.regularizer, "empty_batch": t.empty_batch}
        t.private = True
        regularizer = t.regularizer
        if regularizer is not None:
            self.optimizer.attach_step_hook(_add_regularizer(regularizer))
        t.optimizer, t.regularizer, t.empty_batch = self.optimizer, None, self._empty_batch
        original_loss = t.loss

        def loss(video: torch.Tensor, info: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
            self.optimizer.batch_index = info.get("dataset_index")
            return original_loss(video, info, generator)

        t.loss = loss  # type: ignore[method-assign]
        return self

    def _empty_batch(self) -> None:
        """An empty Poisson batch: zero per-sample gradients, so the step adds noise only."""
        self.optimizer.batch_index = None
        for p in self.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))

    def __exit__(self, *exc: object) -> None:
        t = self.trainer
        t.optimizer, t.regularizer, t.empty_batch = (
            self._saved["optimizer"], self._saved["regularizer"], self._saved["empty_batch"],
        )  # fmt: skip
        del t.loss  # back to the class's method
        t.private = False
        self.gsm.cleanup()  # hooks off, Opacus' attributes gone: the model is a plain model again
        for p in t.model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def _add_regularizer(regularizer: Callable[[], torch.Tensor]) -> Callable[[DPOptimizer], None]:
    def hook(optimizer: DPOptimizer) -> None:
        params = optimizer.params
        with torch.enable_grad():
            grads = torch.autograd.grad(regularizer(), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None and p.grad is not None:
                p.grad += g

    return hook


def reserve_round(
    model: nn.Module, plan: DPPlan, state: Any, *, run: str, phase: str, server_round: int, epsilon_max: float
) -> int:
    """Check that DP-SGD can train the model and reserve the round's privacy cost in the site's ledger; returns the
    ledger entry. Raises PrivacyRefused, reserving nothing, when the round would exceed the site's budget. It needs
    the plan only (patient ids from the data index), so the site calls it before any video is decoded."""
    from fedecho.privacy.ledger import PrivacyLedger

    check_private_model(model)  # refuse before anything is reserved
    with PrivacyLedger(state) as ledger:
        entry, _ = ledger.reserve(
            run=run, phase=phase, round=server_round, noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate, steps=plan.steps, delta=plan.delta, epsilon_max=epsilon_max, unit=plan.unit,
        )  # fmt: skip
    return entry


def private_epoch(trainer: Trainer, dataset: Any, plan: DPPlan, seed: int, workers: int = 0) -> EpochResult:
    """The round's DP-SGD steps (every rank of a data-parallel group runs them with the same secret seed)."""
    with PrivateTraining(trainer, plan, seed) as private:
        return trainer.train_epoch(private.loader(dataset, workers))


def spend_round(state: Any, entry: int, plan: DPPlan) -> dict[str, float]:
    """Mark a reserved round spent once it trained (`reserve_round` reserved it before any video was decoded).

    Returns what the server stores per site: the site's total epsilon at its delta after this round (all rounds,
    runs and restarts), the delta, the noise, sample rate and steps used, and whether that epsilon holds per
    patient."""
    from fedecho.privacy.ledger import PrivacyLedger

    with PrivacyLedger(state) as ledger:
        ledger.spend(entry)
        epsilon = ledger.epsilon(plan.delta)
        per_patient = ledger.per_patient()
    return {
        "epsilon": epsilon,
        "delta": plan.delta,
        "dp_noise_multiplier": plan.noise_multiplier,
        "dp_sample_rate": plan.sample_rate,
        "dp_steps": float(plan.steps),
        "dp_per_patient": float(per_patient),
    }


__all__ = [
    "PrivateTraining",
    "batchnorm_layers",
    "check_private_model",
    "poisson",
    "private_epoch",
    "reserve_round",
    "secret_seed",
    "spend_round",
]
