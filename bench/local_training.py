"""Local training on the phantom: pre-training + EF fine-tuning of echo_vit_tiny on 2 CPU cores,
and whether pre-training helps when labels are few (10 % of the training videos).

    python bench/local_training.py --videos 300

Pre-training runs on a separate unlabeled phantom pool (--unlabeled videos, another seed), then
fine-tuning on the labelled phantom's TRAIN split; all runs report test EF MAE with test-time averaging:
  mean predictor | scratch, all labels | pre-trained, all labels | scratch, 10 % | pre-trained, 10 %
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedecho.data import open_source
from fedecho.synth import synthesize
from fedecho.train import load_run_config, train_phase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=300)
    p.add_argument("--config", type=Path, default=Path("configs/phantom_tiny.toml"))
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--unlabeled", type=int, default=600, help="unlabeled phantom videos for pre-training (0: none)")
    p.add_argument("--work", type=Path, default=Path("bench/work/local_training"))
    p.add_argument("--out", type=Path, default=Path("bench/results/local_training.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    data = args.work / f"phantom-{args.videos}"
    if not (data / "FileList.csv").is_file():
        synthesize(data, videos=args.videos, sites=1, fmt="echonet", seed=0)
    base = load_run_config(args.config)
    base.data.root, base.data.cache = str(data), str(args.work / "cache")
    if args.pretrain_epochs:
        base.pretrain.epochs = args.pretrain_epochs
    if args.finetune_epochs:
        base.finetune.epochs = args.finetune_epochs
    scan = open_source(data).scan()
    train_ef = [r.targets["ef"] for r in scan.records if r.split == "train"]
    test_ef = np.array([r.targets["ef"] for r in scan.records if r.split == "test"])
    baseline = float(np.abs(test_ef - np.mean(train_ef)).mean())
    results: dict[str, dict[str, float]] = {"mean predictor": {"ef_mae": baseline}}
    # Pre-training sees a separate, larger unlabeled pool (another seed: other patients), as a
    # foundation model does; with --unlabeled 0 it uses the labelled set's training videos.
    pool = args.work / f"unlabeled-{args.unlabeled}"
    if args.unlabeled and not (pool / "FileList.csv").is_file():
        synthesize(pool, videos=args.unlabeled, sites=1, fmt="echonet", seed=1)
    t0 = time.time()
    pre = args.work / f"pretrain-{args.unlabeled}-{base.pretrain.epochs}"
    train_phase(base, "pretrain", pre, data=pool if args.unlabeled else None, resume=True, progress=False)
    pretrain_s = time.time() - t0
    for label, fraction, init in (
        ("scratch, all labels", 1.0, None),
        ("pre-trained, all labels", 1.0, pre / "model.safetensors"),
        (f"scratch, {args.fraction:.0%} labels", args.fraction, None),
        (f"pre-trained, {args.fraction:.0%} labels", args.fraction, pre / "model.safetensors"),
    ):
        cfg = copy.deepcopy(base)
        cfg.data.label_fraction = fraction
        if fraction < 1:  # equal number of updates: more epochs over fewer videos
            cfg.finetune.epochs = round(cfg.finetune.epochs / fraction / 2)
        t = time.time()
        folder = args.work / f"{pre.name}-{label.replace(' ', '_').replace(',', '').replace('%', 'pct')}"
        rec = train_phase(cfg, "finetune", folder, init=init, resume=True, progress=False)
        results[label] = {"ef_mae": rec["ef_mae"], "ef_r2": rec["ef_r2"], "seconds": round(time.time() - t, 1)}
        print(label, results[label], flush=True)
    summary = {
        "videos": args.videos, "train_videos": len(train_ef), "test_videos": len(test_ef), "unlabeled": args.unlabeled,
        "pretrain_epochs": base.pretrain.epochs, "finetune_epochs": base.finetune.epochs,
        "pretrain_seconds": round(pretrain_s, 1), "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    pool_text = f"{args.unlabeled} unlabeled videos (75 % used)" if args.unlabeled else "the training videos"
    print(f"\npre-training: {base.pretrain.epochs} epochs on {pool_text}, {pretrain_s / 60:.1f} min\n")
    print("| run (echo_vit_tiny, STF-Net) | test EF MAE | R2 | fine-tune time |")
    print("|---|---|---|---|")
    for label, r in results.items():
        r2 = f"{r['ef_r2']:.2f}" if "ef_r2" in r else "-"
        secs = f"{r['seconds'] / 60:.1f} min" if "seconds" in r else "-"
        print(f"| {label} | {r['ef_mae']:.2f} | {r2} | {secs} |")


if __name__ == "__main__":
    main()
