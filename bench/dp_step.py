"""Differential privacy's cost: an Opacus DP-SGD step against a non-private step at the same batch.

    python bench/dp_step.py --model echo_vit_tiny --batch 4 --steps 4

Both arms train the same model (STF-Net with GroupNorm, which DP-SGD needs) on the same random
clips; the DP arm clips each sample's gradient and adds noise (fedecho.privacy.dp.PrivateTraining,
Poisson sampling at rate 1 so every step sees the whole batch). Prints seconds per step and the
ratio, and writes bench/results/dp_step.json. Issue 6's target: at most 1.3x.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedecho.models import create_model
from fedecho.privacy.dp import PrivateTraining
from fedecho.privacy.dp_policy import DPPlan
from fedecho.train import Trainer
from fedecho.train.config import PhaseSection


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


def seconds_per_step(model_name: str, phase: str, dp: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    tasks = ["ef"] if phase == "finetune" else []
    model = create_model(model_name, decoder=phase == "pretrain", tasks=tasks, stf_norm="group")
    mc = model.cfg
    data = RandomClips(batch, mc.num_frames, mc.img_size)
    trainer = Trainer(model, phase, PhaseSection(batch_size=batch, warmup_epochs=0, tasks=["ef"]), 1)  # type: ignore[arg-type]
    if dp:
        plan = DPPlan(1.0, 1.0, 1.0, steps, batch, tuple((i,) for i in range(batch)), "video", 1e-5)
        with PrivateTraining(trainer, plan) as private:
            trainer.train_epoch(private.loader(data))  # warm-up (hooks, allocator)
            t0 = time.perf_counter()
            res = trainer.train_epoch(private.loader(data))
    else:
        trainer.train_epoch(DataLoader(data, batch_size=batch), max_steps=1)
        t0 = time.perf_counter()
        res = trainer.train_epoch(DataLoader([data[i] for i in range(batch)] * steps, batch_size=batch))
    return (time.perf_counter() - t0) / max(res.steps, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="echo_vit_tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/dp_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for phase in ("pretrain", "finetune"):
        plain = seconds_per_step(args.model, phase, False, args.batch, args.steps)
        private = seconds_per_step(args.model, phase, True, args.batch, args.steps)
        rows.append({"phase": phase, "plain_s": plain, "dp_s": private, "ratio": private / plain})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "batch": args.batch, "rows": rows}, indent=2) + "\n")
    print(f"\n{args.model}, batch {args.batch}, {args.threads} threads (target: DP at most 1.3x)\n")
    print("| phase | non-private s/step | DP-SGD s/step | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['plain_s']:.2f} | {r['dp_s']:.2f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
