"""Differential privacy's cost: a DP-SGD step against a non-private step at the same batch.

    python bench/dp_step.py --configs echo_vit_tiny:8,echo_vit_small:4 --steps 5

Both arms train the same model (STF-Net with GroupNorm, which DP-SGD needs) on the same random
clips; the DP arm computes each sample's gradient, clips it and adds noise (fedecho.train.dp.PrivateTraining,
Poisson sampling at rate 1 so every step sees the whole batch). The arms' steps alternate and each step
is timed in this process's CPU seconds (both arms use the same --threads), so other work on a shared
machine does not enter the ratio; the median step of each arm counts. With --device cuda both arms
train on the GPU under the engine's bf16 autocast (Opacus casts the per-sample gradients to the fp32
parameters' dtype) and a step is timed in wall seconds once the GPU is done: there the work is the
GPU's, not this process's CPU time. Prints seconds per step and the ratio, and writes
bench/results/dp_step.json (with the `table` rows `make bench` collects).
The target: at most 1.3x.

The "lora" phase fine-tunes with LoRA adapters of rank --lora-rank in the encoder (fedecho.models.lora): only
the adapters, STF-Net and the head train, so only they need per-sample gradients. Its rows also give both of
its steps against the plain full fine-tuning step of the same model and batch (`vs_full`, `dp_vs_full`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _device import add_device_option, clock, compute_dtype
from _table import table_row
from torch.utils.data import DataLoader, Dataset

from fedecho.models import create_model
from fedecho.models.lora import LoraSpec, apply_lora
from fedecho.privacy.dp_policy import DPPlan
from fedecho.train import Trainer
from fedecho.train.config import PhaseSection
from fedecho.train.dp import PrivateTraining

TARGET = 1.3


class RandomClips(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """Fixed random clips with an EF target: the step's cost does not depend on the pixels."""

    def __init__(self, n: int, frames: int, size: int):
        gen = torch.Generator().manual_seed(0)
        self.items = [
            (
                torch.rand(3, frames, size, size, generator=gen),
                {"frame_index": torch.arange(frames), "ef": torch.tensor(50.0)},
            )
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.items[i]

    def set_epoch(self, epoch: int) -> None:  # the DP loader calls it like the real dataset's
        pass


def _trainer(
    model_name: str, phase: str, batch: int, device: torch.device, lora_rank: int = 0, head: str = "linear"
) -> Trainer:
    """phase "lora": fine-tuning with rank-`lora_rank` adapters in the encoder."""
    torch.manual_seed(0)
    tasks = [] if phase == "pretrain" else ["ef"]
    model = create_model(model_name, decoder=phase == "pretrain", tasks=tasks, stf_norm="group", head=head)
    if phase == "lora":
        apply_lora(model, LoraSpec(lora_rank))
    cfg = PhaseSection(batch_size=batch, warmup_epochs=0, tasks=["ef"])
    return Trainer(model, "finetune" if phase == "lora" else phase, cfg, 1, device=device)  # type: ignore[arg-type]


def _timed(step: Any, device: torch.device) -> float:
    """On CPU, CPU seconds of this process (all its threads): the step's own work, whatever else the machine
    runs. On CUDA, wall seconds until the GPU is done: the work is the GPU's, not this process's."""
    now = (lambda: clock(device)) if device.type == "cuda" else time.process_time
    t0 = now()
    step()
    return now() - t0


def step_seconds(
    model_name: str,
    phase: str,
    batch: int,
    steps: int,
    device: torch.device,
    lora_rank: int = 0,
    head: str = "linear",
) -> tuple[float, float]:
    """Median seconds (`_timed`) of a non-private and of a DP-SGD step, the two alternating (after one warm-up
    each)."""
    plain = _trainer(model_name, phase, batch, device, lora_rank, head)
    private = _trainer(model_name, phase, batch, device, lora_rank, head)
    mc = plain.model.cfg
    data = RandomClips(batch, mc.num_frames, mc.img_size)
    plan = DPPlan(1.0, 1.0, 1.0, 1, batch, tuple((i,) for i in range(batch)), "video", 1e-5)
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    with PrivateTraining(private, plan) as dp:
        arms = {
            "plain": lambda: plain.train_epoch(DataLoader(data, batch_size=batch)),
            "dp": lambda: private.train_epoch(dp.loader(data)),
        }
        for arm in arms.values():  # warm-up (allocator, first-call costs)
            arm()
        for _ in range(steps):
            for name, arm in arms.items():
                times[name].append(_timed(arm, device))
    return statistics.median(times["plain"]), statistics.median(times["dp"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="echo_vit_tiny:8,echo_vit_small:4", help="model:batch, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--phases", default="pretrain,finetune,lora", help="of pretrain, finetune, lora (comma-separated)")
    p.add_argument("--lora-rank", type=int, default=8, help="the lora phase's adapter rank")
    p.add_argument("--head", choices=("linear", "mlp"), default="linear", help="the fine-tuned model's heads")
    add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("bench/results/dp_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    phases = [ph for ph in args.phases.split(",") if ph]
    unknown = sorted(set(phases) - {"pretrain", "finetune", "lora"})
    if unknown:
        p.error(f"--phases: unknown {', '.join(unknown)} (pretrain, finetune, lora)")
    for config in [c for c in args.configs.split(",") if c]:
        model, batch = config.split(":")
        full: float | None = None  # the plain full fine-tuning step, the lora rows' reference
        for phase in phases:
            plain, private = step_seconds(model, phase, int(batch), args.steps, args.device, args.lora_rank, args.head)
            row = {"model": model, "batch": int(batch), "phase": phase, "plain_s": plain, "dp_s": private}
            if phase == "finetune":
                full = plain
            if phase == "lora":
                row["lora_rank"] = args.lora_rank
                if full is None:  # measured here when the finetune phase was not asked for
                    full = step_seconds(model, "finetune", int(batch), args.steps, args.device, head=args.head)[0]
                row.update(full_finetune_s=full, vs_full=plain / full, dp_vs_full=private / full)
            rows.append({**row, "ratio": private / plain})
            print(f"{model} batch {batch} {phase}: {plain:.3f} s, DP {private:.3f} s", flush=True)
    table = [
        table_row("DP step", f"DP-SGD / non-private step, {r['model']} batch {r['batch']}, {_label(r)}",
                  round(r["ratio"], 2), "x", f"<= {TARGET}x", r["ratio"] <= TARGET)
        for r in rows
    ]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    clock_name = "wall s" if args.device.type == "cuda" else "CPU s"
    summary = {
        "device": str(args.device), "dtype": compute_dtype(args.device), "clock": clock_name,
        "threads": args.threads, "steps": args.steps, "head": args.head, "rows": rows, "table": table,
    }  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\n{args.device}, {args.threads} threads, {clock_name}, median of {args.steps} alternating steps "
        f"(target: DP at most {TARGET}x)\n"
    )
    print(
        f"| model | batch | phase | non-private {clock_name}/step | DP-SGD {clock_name}/step | ratio "
        "| non-private / full fine-tuning | DP-SGD / full fine-tuning |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_full']:.2f}x | {r['dp_vs_full']:.2f}x" if "vs_full" in r else "| "
        print(
            f"| {r['model']} | {r['batch']} | {_label(r)} | {r['plain_s']:.3f} | {r['dp_s']:.3f} | {r['ratio']:.2f}x "
            f"| {vs} |"
        )


def _label(row: dict[str, Any]) -> str:
    return f"finetune LoRA r={row['lora_rank']}" if row["phase"] == "lora" else str(row["phase"])


if __name__ == "__main__":
    main()
