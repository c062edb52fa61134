"""Runs of the local engine from a run config: what `fedecho train ...` does.

An output folder holds `model.safetensors` (+ `.json`), `train_state.pt` (optimiser, schedule,
epoch: for `--resume`) and `metrics.jsonl` (one JSON object per epoch and per evaluation).
Every file is written atomically; metrics past the last checkpoint are dropped on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from fedecho.data import Augment, ClipSampler, EchoVideoDataset, FrameCache, open_source
from fedecho.data.records import ScanResult, VideoRecord
from fedecho.models import CheckpointError, EchoVisionFM, create_model, load_checkpoint, save_checkpoint
from fedecho.models.checkpoint import load_state
from fedecho.models.lora import apply_lora, is_adapter_key, merge_lora, phase_spec, to_lora_state
from fedecho.storage.files import atomic_write_bytes
from fedecho.train.config import PhaseSection, RunConfig
from fedecho.train.engine import EpochResult, Phase, Trainer, evaluate, pick_device, pretrain_loss
from fedecho.train.job import TrainingJob
from fedecho.train.parallel import check_devices

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


def partition_of(record: VideoRecord, parts: int) -> int:
    """A stable virtual-hospital index for a record: by patient when the source knows patients."""
    digest = hashlib.sha256((record.group or record.key).encode()).digest()
    return int.from_bytes(digest[:4], "little") % parts


def make_datasets(
    cfg: RunConfig,
    model: EchoVisionFM,
    tasks: tuple[str, ...],
    data: str | Path | None = None,
    seed: int = 0,
    partition: tuple[int, int] | None = None,
) -> dict[str, EchoVideoDataset]:
    """train (random clips, augmented), val_clips (random clips, for the pre-training loss),
    val and test (all clips, for metrics) datasets for the model's geometry, from one scan.
    partition (k, n): only the k-th of n virtual hospitals (patients never straddle two)."""
    root = Path(data or cfg.data.root)
    if not str(root):
        raise ValueError("no data: set [data] root in the config or pass --data")
    options = {"labels": cfg.data.labels} if cfg.data.labels else {}
    source = open_source(root, cfg.data.source, **options)
    scan = source.scan()
    if partition is not None:
        k, n = partition
        scan = ScanResult([r for r in scan.records if partition_of(r, n) == k], scan.problems)
    mc = model.cfg
    common: dict[str, Any] = {
        "targets": tasks,
        "sampler": ClipSampler(mc.num_frames, cfg.data.period or None),
        "size": mc.img_size,
        "cache": FrameCache(cfg.data.cache or None),
        "scan": scan,
        "seed": seed,
    }
    test_clips = cfg.data.max_test_clips or None
    out = {
        "train": EchoVideoDataset(source, "train", augment=Augment() if cfg.data.augment else None, **common),
        "val_clips": EchoVideoDataset(source, "val", **common),
        "val": EchoVideoDataset(source, "val", test_time=True, max_clips=test_clips, **common),
        "test": EchoVideoDataset(source, "test", test_time=True, max_clips=test_clips, **common),
    }
    if not out["train"].records:
        raise ValueError(f"{root}: no training videos with targets {list(tasks) or 'none'}")
    return out


def init_encoder(model: EchoVisionFM, path: str | Path) -> None:
    """Copy a pre-trained checkpoint's encoder into model; shapes must agree.

    Into a LoRA model (`fedecho.models.lora`) the encoder's weights go under their wrapped names and the
    adapters keep their fresh start (B = 0: the model computes what the pre-trained one does). From a LoRA
    fine-tuned checkpoint the encoder comes with its adapters folded in."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint to initialise from")
    raw = load_file(str(path))
    if any(is_adapter_key(k) for k in raw):
        raw = merge_lora(load_checkpoint(path)).state_dict()
    state = to_lora_state({k: v for k, v in raw.items() if k.startswith("encoder.")}, model)
    if not state:
        raise CheckpointError(f"{path}: holds no encoder tensors")
    own = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.") and not is_adapter_key(k)}
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{path}: encoder tensors missing: {', '.join(missing[:6])}")
    load_state(model, state, str(path), strict=False)


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    path = out / METRICS_FILE
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + (json.dumps(record) + "\n").encode())


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(out: Path, epoch: int) -> None:
    kept = [r for r in read_metrics(out) if r.get("epoch", 0) <= epoch]
    atomic_write_bytes(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept).encode())


def _save_state(out: Path, trainer: Trainer) -> None:
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    atomic_write_bytes(out / STATE_FILE, buf.getvalue())


@dataclass
class EpochBookkeeping:
    """After each epoch (on rank 0): validate when due, append the metrics, checkpoint the model and the trainer."""

    phase: Phase
    pcfg: PhaseSection
    out: Path
    val: Any  # val_clips (pre-training loss) or val (fine-tuning metrics)
    tasks: tuple[str, ...]
    progress: bool

    def __call__(self, trainer: Trainer, res: EpochResult) -> None:
        model, pcfg = trainer.model, self.pcfg
        record: dict[str, Any] = {
            "phase": self.phase, "epoch": trainer.epoch, "train_loss": res.loss, "lr": res.lr,
            "examples": res.examples, "seconds": round(res.seconds, 2), "time": time.time(),
        }  # fmt: skip
        if len(self.val) and (trainer.epoch % pcfg.eval_every == 0 or trainer.epoch == pcfg.epochs):
            if self.phase == "pretrain":
                record["val_loss"] = pretrain_loss(model, self.val, pcfg.batch_size, pcfg.seed)
            else:
                record.update({f"val_{k}": v for k, v in evaluate(model, self.val, list(self.tasks)).items()})
        _append_metrics(self.out, record)
        meta = {"phase": self.phase, "epoch": trainer.epoch, "tasks": list(self.tasks)}
        save_checkpoint(model, self.out / MODEL_FILE, meta)
        _save_state(self.out, trainer)
        shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float) and k not in ("time",)}
        Console(quiet=not self.progress).print(f"{self.phase} epoch {trainer.epoch}/{pcfg.epochs}: {shown}")


def train_phase(
    cfg: RunConfig,
    phase: Phase,
    out: str | Path,
    data: str | Path | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    console: Console | None = None,
    devices: int = 1,
) -> dict[str, Any]:
    """Pre-train or fine-tune for the phase's epochs, checkpointing after each; returns the last record.

    devices > 1: data-parallel over that many devices of `device`'s kind (`fedecho.train.parallel`), the run file's
    batch size being the global batch."""
    console = console or Console(quiet=not progress)
    check_devices(devices, pick_device(device).type)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pcfg = cfg.pretrain if phase == "pretrain" else cfg.finetune
    tasks = tuple(pcfg.tasks) if phase == "finetune" else ()
    torch.manual_seed(pcfg.seed)
    resuming = resume and (out / STATE_FILE).is_file() and (out / MODEL_FILE).is_file()
    if resuming:
        model = load_checkpoint(out / MODEL_FILE)
    elif phase == "pretrain":
        model = create_model(cfg.model_name, decoder=True, **cfg.model_overrides)
    else:
        model = create_model(cfg.model_name, decoder=False, **{**cfg.model_overrides, "tasks": list(tasks)})
        apply_lora(model, phase_spec(pcfg))  # [finetune] lora_rank > 0: adapters train, the encoder stays
        init = init or pcfg.init or None
        if init:
            init_encoder(model, init)
            console.print(f"encoder initialised from {init}")
    sets = make_datasets(cfg, model, tasks, data, pcfg.seed)
    train = sets["train"]
    train.prepare(progress=progress)
    if phase == "finetune" and cfg.data.label_fraction < 1:
        train.limit(cfg.data.label_fraction, pcfg.seed)
    state = None
    if resuming:
        state = torch.load(out / STATE_FILE, weights_only=False)
        _truncate_metrics(out, int(state["epoch"]))
        console.print(f"resuming {phase} at epoch {int(state['epoch']) + 1} of {pcfg.epochs}")
    val = sets["val_clips"] if phase == "pretrain" else sets["val"]
    val.prepare(progress=progress)
    if devices > 1:
        kind = pick_device(device).type
        console.print(f"data-parallel over {devices} {kind} devices, global batch {pcfg.batch_size}")
    job = TrainingJob(
        model, phase, pcfg, train, pcfg.seed, cfg.data.num_workers, device, trainer_state=state,
        after_epoch=EpochBookkeeping(phase, pcfg, out, val, tasks, progress), progress=progress,
    )  # fmt: skip
    result = job.run(devices)
    model.load_state_dict(result.state)
    model.to(pick_device(device))
    record = read_metrics(out)[-1] if read_metrics(out) else {}
    if phase == "finetune":
        test = sets["test"]
        test.prepare(progress=progress)
        if len(test):
            epoch = int(result.trainer.get("epoch", pcfg.epochs))
            record = {"phase": "test", "epoch": epoch, **evaluate(model, test, list(tasks), progress=progress)}
            _append_metrics(out, record)
    return record


def evaluate_checkpoint(
    cfg: RunConfig,
    checkpoint: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Full-split metrics of a fine-tuned checkpoint, with test-time averaging over clips."""
    model = load_checkpoint(checkpoint).to(pick_device(device))
    tasks = tuple(model.cfg.tasks)
    if not tasks:
        raise CheckpointError(f"{checkpoint}: has no task heads (a pre-training checkpoint?)")
    ds = make_datasets(cfg, model, tasks, data, cfg.finetune.seed)[split]
    ds.prepare(progress=progress)
    return evaluate(model, ds, list(tasks), progress=progress)
