"""Is the phantom learnable? A small 3-D CNN EF regressor against predicting the training mean.

Generates N phantom videos (EchoNet layout), reads them back through fedecho.data, trains a
tiny convolutional regressor on the TRAIN split and reports EF MAE on the TEST split (all
clips averaged) next to the mean predictor's. Prints a markdown row and writes JSON.

    python bench/phantom_learnability.py --videos 300 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedecho.data import Augment, ClipSampler, EchoVideoDataset, average_over_clips, open_source
from fedecho.synth import synthesize


class TinyEFNet(nn.Module):
    """Conv3d stack; spatial pooling per time step, then max/min/mean over time (EF is a ratio
    of the largest and smallest cavity, so the head sees the extremes)."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(1, width, (1, 2, 2)),
            block(width, 2 * width, (1, 2, 2)),
            block(2 * width, 4 * width, (1, 2, 2)),
            block(4 * width, 4 * width, (1, 2, 2)),
        )
        self.head = nn.Sequential(nn.Linear(12 * width, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x[:, :1]).mean(dim=(3, 4))  # (B, C, T)
        z = torch.cat([f.amax(-1), f.amin(-1), f.mean(-1)], dim=1)
        return self.head(z).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=300)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("bench/work/learnability"))
    p.add_argument("--out", type=Path, default=Path("bench/results/phantom_learnability.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    data = args.work / f"phantom-{args.videos}-{args.seed}"
    t0 = time.time()
    if not (data / "FileList.csv").is_file():
        synthesize(data, videos=args.videos, sites=1, fmt="echonet", seed=args.seed)
    t_synth = time.time() - t0
    src = open_source(data)
    scan = src.scan()
    sampler = ClipSampler(16)
    common = {"targets": ("ef",), "sampler": sampler, "size": args.size, "cache": args.work / "cache", "scan": scan}
    train = EchoVideoDataset(src, split="train", augment=Augment(pad=4), seed=args.seed, **common)
    test = EchoVideoDataset(src, split="test", test_time=True, **common)
    train.prepare(), test.prepare()
    mean_ef = float(np.mean([r.targets["ef"] for r in train.records]))
    y_test = np.array([r.targets["ef"] for r in test.records])
    model = TinyEFNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * ((len(train) + 15) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t1 = time.time()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        model.train()
        losses = []
        for x, y in DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            loss = nn.functional.mse_loss(model(x), (y["ef"] - mean_ef) / 10.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}", flush=True)
    t_train = time.time() - t1
    model.eval()
    with torch.no_grad():
        pred = np.array([float(average_over_clips(model, test[i][0])) * 10.0 + mean_ef for i in range(len(test))])
    mae = float(np.abs(pred - y_test).mean())
    mae_mean = float(np.abs(mean_ef - y_test).mean())
    r2 = 1.0 - float(((pred - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())
    result = {
        "videos": args.videos,
        "train": len(train),
        "test": len(test),
        "epochs": args.epochs,
        "size": args.size,
        "ef_mae_model": round(mae, 2),
        "ef_mae_mean_predictor": round(mae_mean, 2),
        "ratio": round(mae / mae_mean, 3),
        "r2": round(r2, 3),
        "synth_s": round(t_synth, 1),
        "train_s": round(t_train, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| videos (train/test) | EF MAE, small 3-D CNN | EF MAE, training mean | ratio | R2 | train time |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.videos} ({len(train)}/{len(test)}) | {mae:.2f} | {mae_mean:.2f} | {mae / mae_mean:.2f} "
        f"| {r2:.2f} | {t_train / 60:.1f} min |"
    )


if __name__ == "__main__":
    main()
