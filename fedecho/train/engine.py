"""The local training engine: masked-autoencoder pre-training, fine-tuning, evaluation.

`Trainer` owns the optimisation state (AdamW from timm's factory, warm-up + cosine schedule from
timm, gradient accumulation, bf16 autocast on CUDA and fp32 on CPU) and runs whole epochs;
the federated ClientApp calls the same `Trainer.train_epoch` and `evaluate` unchanged. On several
devices (`fedecho.train.parallel`) each rank's Trainer steps on its share of every global batch
through DistributedDataParallel, and the step is the one device's step on the global batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from fedecho.data import EchoVideoDataset
from fedecho.device import autocast, pick_device, synchronize
from fedecho.models import EchoVisionFM, get_task
from fedecho.train.config import PhaseSection
from fedecho.train.metrics import reduced_ef_auroc, task_metrics
from fedecho.train.parallel import SINGLE, Group

Phase = Literal["pretrain", "finetune"]


def set_trainable(model: EchoVisionFM, phase: Phase, freeze_encoder: bool) -> None:
    """Pre-training trains encoder and decoder; fine-tuning trains fusion and heads, and the
    encoder unless it is frozen (linear probing). An encoder with LoRA adapters trains only those:
    its own weights stay the pre-trained ones (`fedecho.models.lora`)."""
    from fedecho.models.lora import has_lora, is_adapter_key

    for p in model.parameters():
        p.requires_grad_(True)
    if phase == "finetune" and freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    elif has_lora(model):
        for name, p in model.encoder.named_parameters():
            p.requires_grad_(is_adapter_key("." + name))


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, TextColumn("{task.fields[status]}"), disable=not enabled, transient=True)


@dataclass
class EpochResult:
    loss: float
    steps: int
    examples: int
    seconds: float
    lr: float


class _TrainingForward(nn.Module):
    """The model's training forward as one module's forward: what DistributedDataParallel wraps, so that it
    sees every step of pre-training (`forward_pretrain`) as of fine-tuning."""

    def __init__(self, model: EchoVisionFM):
        super().__init__()
        self.model = model

    def forward(self, video: torch.Tensor, extra: torch.Tensor, pretrain: bool) -> Any:
        return self.model.forward_pretrain(video, extra)[0] if pretrain else self.model(video, extra)


def _batchnorm_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Trainer:
    def __init__(
        self,
        model: EchoVisionFM,
        phase: Phase,
        cfg: PhaseSection,
        steps_per_epoch: int,
        device: torch.device | None = None,
        group: Group = SINGLE,
    ):
        self.model, self.phase, self.cfg, self.group = model, phase, cfg, group
        self.device = device or (torch.device(group.device) if group.distributed else pick_device())
        norms = _batchnorm_layers(model) if group.distributed else []
        if norms:
            if self.device.type != "cuda":  # SyncBatchNorm runs on GPUs only
                raise ValueError(
                    "data-parallel training on CPUs cannot share BatchNorm statistics between devices "
                    f'({norms[0]}): set [model] stf_norm = "group" in the run file'
                )
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the global batch's statistics, as on one device
        self.model.to(self.device)
        set_trainable(model, phase, cfg.freeze_encoder)
        self.tasks = [get_task(t) for t in cfg.tasks] if phase == "finetune" else []
        if phase == "finetune":
            missing = [t.name for t in self.tasks if t.name not in model.heads]
            if missing:
                raise ValueError(f"model has no head for task(s) {missing}; heads: {list(model.heads)}")
        # AdamW, or heavy-ball SGD: the local step of a federation whose server optimiser adapts (FedAdam)
        kind = {"adamw": {"opt": "adamw", "betas": tuple(cfg.betas)}, "sgd": {"opt": "momentum", "momentum": 0.9}}
        self.optimizer = create_optimizer_v2(
            model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None,
            fused=True,  # one kernel over all parameters: about half the for-loop version's time on CPU
            **kind[cfg.optimizer],
        )
        updates_per_epoch = max(1, math.ceil(steps_per_epoch / cfg.accumulate))
        # One update in all (a lock-step round) has nothing to anneal: timm warns of that on every round.
        timm_log = logging.getLogger("timm.scheduler.cosine_lr")
        level = timm_log.level
        timm_log.setLevel(logging.ERROR)
        try:
            self.scheduler = CosineLRScheduler(
                self.optimizer,
                t_initial=max(1, cfg.epochs * updates_per_epoch),
                lr_min=cfg.min_lr,
                warmup_t=round(cfg.warmup_epochs * updates_per_epoch),
                warmup_lr_init=min(cfg.min_lr, cfg.lr),
                t_in_epochs=False,
            )
        finally:
            timm_log.setLevel(level)
        self.epoch = 0
        self.updates = 0
        # An extra loss term added at every step (FedProx's proximal term; the local engine stays unchanged).
        self.regularizer: Callable[[], torch.Tensor] | None = None
        # Run after every optimiser step (SCAFFOLD's drift correction, `fedecho.fl.methods`).
        self.after_step: Callable[[], None] | None = None
        # What a step on an empty batch does (DP-SGD's Poisson sampling can draw none: the noisy step still
        # happens, `fedecho.train.dp`); None: an empty batch is an error.
        self.empty_batch: Callable[[], None] | None = None
        # DP-SGD (`fedecho.train.dp`): Opacus' optimizer averages the ranks' clipped, noised gradients, not DDP.
        self.private = False
        self._plain = _TrainingForward(model)
        self._ddp: nn.Module | None = None

    def _forward(self) -> nn.Module:
        if not self.group.distributed or self.private:
            return self._plain
        if self._ddp is None:  # built at the first step: every rank starts from rank 0's parameters
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self._plain, device_ids=ids)
        return self._ddp

    def masks(self, info: dict[str, torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
        """This share's masks: the global batch's, drawn as one device draws them, at the share's positions."""
        if "batch_total" not in info:  # a plain loader: the batch is the global batch
            return self.model.make_mask(n, generator)
        mask = self.model.make_mask(int(info["batch_total"][0]), generator)
        return mask[info["batch_position"].clamp(min=0)] if n else mask[:0]

    def loss(self, video: torch.Tensor, info: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        if self.phase == "pretrain":
            mask = self.masks(info, video.shape[0], generator).to(self.device)
            return self._forward()(video, mask, True)  # type: ignore[no-any-return]
        out = self._forward()(video, info["frame_index"].to(self.device), False)
        heads = self.model.heads  # a regression head's loss is in its standardised units (its target statistics)
        return sum(t.loss(out[t.name], info[t.name].to(self.device), heads.stats(t.name)) for t in self.tasks)  # type: ignore[return-value]

    def train_epoch(self, loader: Iterable, progress: bool = False, max_steps: int | None = None) -> EpochResult:
        """One pass over loader (or max_steps batches); deterministic in (seed, epoch).

        On several ranks each loss is weighted by the rank's share of the global batch, so the averaged gradient
        is the global batch's; the loss and examples reported are the global batch's on every rank."""
        self.model.train()
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        total, steps, examples, losses = 0.0, 0, 0, 0
        synchronize(self.device)  # earlier queued work is not this epoch's
        t0 = time.time()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        if max_steps is not None and n is not None:
            n = min(n, max_steps)
        with _progress(progress) as bar:
            task = bar.add_task(f"{self.phase} epoch {self.epoch + 1}", total=n, status="")
            for video, info in loader:
                size = video.shape[0]
                real = int((info["batch_position"] >= 0).sum()) if "batch_position" in info else size
                local, extra = 0.0, 0.0
                if not size:
                    if self.empty_batch is None:
                        raise ValueError("the loader gave an empty batch")
                    if self.phase == "pretrain":
                        self.masks(info, 0, gen)  # the global batch's masks are drawn on every rank
                    self.empty_batch()
                else:
                    video = video.to(self.device, non_blocking=True)
                    with autocast(self.device):
                        loss = self.loss(video, info, gen)
                        reg = self.regularizer() if self.regularizer is not None else None
                    objective = loss
                    if "batch_total" in info and not self.private:  # this rank's share of the global batch
                        objective = loss * (real * self.group.world / int(info["batch_total"][0]))
                    if reg is not None:
                        objective = objective + reg
                        extra = reg.item()
                    if not torch.isfinite(objective):
                        value = objective.item()
                        raise FloatingPointError(f"{self.phase} loss became {value} at epoch {self.epoch + 1}")
                    (objective / self.cfg.accumulate).backward()
                    local = loss.item() * real
                loss_sum, count = self.group.all_sum([local, float(real)])
                if count:
                    examples += int(count)
                    total += loss_sum / count + extra
                    losses += 1
                steps += 1
                if steps % self.cfg.accumulate == 0:
                    self._update()
                bar.update(task, advance=1, status=f"loss {total / max(losses, 1):.4f}")
                if max_steps is not None and steps >= max_steps:
                    break
        if steps % self.cfg.accumulate:  # a last, partial accumulation group
            self._update()
        self.epoch += 1
        lr = float(self.optimizer.param_groups[0]["lr"])
        synchronize(self.device)  # the last update's kernels are this epoch's
        return EpochResult(total / max(losses, 1), steps, examples, time.time() - t0, lr)

    def _update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "updates": self.updates,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.updates = int(state["epoch"]), int(state["updates"])
        torch.set_rng_state(state["torch_rng"])


@torch.no_grad()
def predict_clips(
    model: EchoVisionFM, clips: torch.Tensor, frame_index: torch.Tensor, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """Test-time averaging: every clip (N, C, T, H, W) through the model, decoded, mean over clips."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    for i in range(0, len(clips), batch_size):
        with autocast(device):
            out = model(clips[i : i + batch_size].to(device), frame_index[i : i + batch_size].to(device))
        for name, o in out.items():
            dec = get_task(name).decode(o.float()).sum(dim=0)
            sums[name] = sums[name] + dec if name in sums else dec
    return {k: (v / len(clips)).cpu().numpy() for k, v in sums.items()}


@torch.no_grad()
def predict_dataset(
    model: EchoVisionFM, dataset: EchoVideoDataset, tasks: list[str], progress: bool = False, batch_size: int = 8
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(targets, predictions) per task over a test-time dataset, each video's prediction averaged over its clips."""
    if not dataset.test_time:
        raise ValueError("evaluate needs a test_time dataset (all clips of each video)")
    preds: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    ys: dict[str, list[float]] = {t: [] for t in tasks}
    with _progress(progress) as bar:
        job = bar.add_task("evaluate", total=len(dataset), status="")
        for i in range(len(dataset)):
            clips, info = dataset[i]
            out = predict_clips(model, clips, info["frame_index"], batch_size)
            for t in tasks:
                preds[t].append(out[t])
                ys[t].append(float(info[t]))
            bar.advance(job)
    return {t: np.array(ys[t]) for t in tasks}, {t: np.stack(preds[t]) for t in tasks}


def prediction_metrics(ys: dict[str, np.ndarray], preds: dict[str, np.ndarray]) -> dict[str, float]:
    """Every task's metrics from its targets and predictions (`videos`: how many)."""
    metrics: dict[str, float] = {"videos": float(len(next(iter(ys.values()), [])))}
    for t in ys:
        task = get_task(t)
        for k, v in task_metrics(task.kind, ys[t], preds[t]).items():
            metrics[f"{t}_{k}"] = v
        if t == "ef":
            metrics["ef_lt50_auroc"] = reduced_ef_auroc(ys[t], preds[t])
    return metrics


def evaluate(
    model: EchoVisionFM, dataset: EchoVideoDataset, tasks: list[str], progress: bool = False, batch_size: int = 8
) -> dict[str, float]:
    """Metrics over the full evaluation set, averaging predictions over each video's clips."""
    if not tasks:
        return {"videos": float(len(dataset))}
    return prediction_metrics(*predict_dataset(model, dataset, tasks, progress, batch_size))


def pretrain_loss(model: EchoVisionFM, dataset: EchoVideoDataset, batch_size: int = 8, seed: int = 0) -> float:
    """Mean masked-reconstruction loss over a dataset with fixed masks (validation for pre-training)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for video, _ in DataLoader(dataset, batch_size=batch_size):
            mask = model.make_mask(video.shape[0], gen).to(device)
            with autocast(device):
                loss, _, _ = model.forward_pretrain(video.to(device), mask)
            total += loss.item() * video.shape[0]
            n += video.shape[0]
    return total / max(n, 1)
