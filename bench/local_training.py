"""Local training on the phantom: pre-training + EF fine-tuning of echo_vit_tiny on CPU, and
whether pre-training helps when labels are few (10 % of the training videos).

    python bench/local_training.py --videos 300 --unlabeled 600 --pretrain-epochs 60 --seeds 0,1 --threads 1

Every phantom video has its own acquisition (depth, sector width, gain, compression, noise, probe
position: fedecho.synth.phantom.vary_acquisition), as real studies do; --fixed-acquisition renders
every video with the one reference scanner setting instead (an easier, homogeneous task).
Pre-training runs on a separate unlabeled phantom pool (--unlabeled videos, another seed), then
fine-tuning on the labelled phantom's TRAIN split, once per --seeds seed (the seed also draws the
10 % subset); all runs report test EF MAE with test-time averaging, mean over seeds:
  mean predictor | scratch, all labels | pre-trained, all labels | scratch, 10 % | pre-trained, 10 %
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from _table import table_row

from fedecho.data import open_source
from fedecho.synth import synthesize
from fedecho.train import load_run_config, train_phase
from fedecho.train.run import read_metrics


def train_seconds(folder: Path) -> float:
    """Training time of a run from its per-epoch records, so a resumed (already finished) run reports it too."""
    return float(sum(r.get("seconds", 0.0) for r in read_metrics(folder) if r.get("phase") != "test"))


row = functools.partial(table_row, "Local training")


def table_rows(results: dict[str, dict], args: argparse.Namespace) -> list[dict]:
    """Rows for `make bench`'s table: each arm's EF MAE against the mean predictor, and the few-label ratio."""
    base = results["mean predictor"]["ef_mae"]
    n = f"{args.videos} phantom videos"
    rows = [row(f"test EF MAE, mean predictor ({n})", round(base, 2), "EF", None, None)]
    for label, r in results.items():
        if label != "mean predictor":
            rows.append(
                row(f"test EF MAE, {label} ({n})", round(r["ef_mae"], 2), "EF", f"< {base:.2f}", r["ef_mae"] < base)
            )
    few = f"{args.fraction:.0%} labels"
    pre, scratch = results.get(f"pre-trained, {few}"), results.get(f"scratch, {few}")
    if pre and scratch:
        ratio = pre["ef_mae"] / scratch["ef_mae"]
        rows.append(row(f"pre-trained / scratch test EF MAE, {few} ({n})", round(ratio, 3), "x", "< 1", ratio < 1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=300)
    p.add_argument("--config", type=Path, default=Path("configs/phantom_tiny.toml"))
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--unlabeled", type=int, default=600, help="unlabeled phantom videos for pre-training (0: none)")
    p.add_argument("--seeds", type=str, default="0,1", help="fine-tuning seeds (comma-separated)")
    p.add_argument("--fixed-acquisition", action="store_true", help="one scanner setting for every video")
    p.add_argument("--few-labels-only", action="store_true", help="skip the all-labels runs (large --videos)")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads")
    p.add_argument("--work", type=Path, default=Path("bench/work/local_training"))
    p.add_argument("--out", type=Path, default=Path("bench/results/local_training.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    vary = not args.fixed_acquisition
    tag = "-varied" if vary else ""
    data = args.work / f"phantom-{args.videos}{tag}"
    if not (data / "FileList.csv").is_file():
        synthesize(data, videos=args.videos, sites=1, fmt="echonet", seed=0, vary=vary)
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
    results: dict[str, dict] = {"mean predictor": {"ef_mae": baseline}}
    # Pre-training sees a separate, larger unlabeled pool (another seed: other patients), as a
    # foundation model does; with --unlabeled 0 it uses the labelled set's training videos.
    pool = args.work / f"unlabeled-{args.unlabeled}{tag}"
    if args.unlabeled and not (pool / "FileList.csv").is_file():
        synthesize(pool, videos=args.unlabeled, sites=1, fmt="echonet", seed=1, vary=vary)
    pre = args.work / f"pretrain-{args.unlabeled}{tag}-{base.pretrain.epochs}"
    train_phase(base, "pretrain", pre, data=pool if args.unlabeled else None, resume=True, progress=False)
    pretrain_s = train_seconds(pre)
    for label, fraction, init in (
        ("scratch, all labels", 1.0, None),
        ("pre-trained, all labels", 1.0, pre / "model.safetensors"),
        (f"scratch, {args.fraction:.0%} labels", args.fraction, None),
        (f"pre-trained, {args.fraction:.0%} labels", args.fraction, pre / "model.safetensors"),
    ):
        if fraction == 1.0 and args.few_labels_only:
            continue
        runs = []
        for seed in seeds:
            cfg = copy.deepcopy(base)
            cfg.data.label_fraction = fraction
            cfg.finetune.seed = seed
            if fraction < 1:  # equal number of updates: more epochs over fewer videos
                cfg.finetune.epochs = round(cfg.finetune.epochs / fraction / 2)
            name = label.replace(" ", "_").replace(",", "").replace("%", "pct")
            folder = args.work / f"{pre.name}-{data.name}-{name}-seed{seed}"  # one folder per (pre-training, data)
            rec = train_phase(cfg, "finetune", folder, init=init, resume=True, progress=False)
            secs = train_seconds(folder)
            runs.append({"seed": seed, "ef_mae": rec["ef_mae"], "ef_r2": rec["ef_r2"], "seconds": secs})
            print(label, runs[-1], flush=True)
        results[label] = {
            "ef_mae": float(np.mean([r["ef_mae"] for r in runs])),
            "ef_r2": float(np.mean([r["ef_r2"] for r in runs])),
            "seconds": round(float(np.mean([r["seconds"] for r in runs])), 1),
            "seeds": runs,
        }
    summary = {
        "videos": args.videos, "train_videos": len(train_ef), "test_videos": len(test_ef), "unlabeled": args.unlabeled,
        "acquisition": "varied per video" if vary else "fixed", "seeds": seeds, "threads": args.threads,
        "pretrain_epochs": base.pretrain.epochs, "finetune_epochs": base.finetune.epochs,
        "pretrain_seconds": round(pretrain_s, 1), "results": results, "table": table_rows(results, args),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    pool_text = f"{args.unlabeled} unlabeled videos (75 % used)" if args.unlabeled else "the training videos"
    print(f"\npre-training: {base.pretrain.epochs} epochs on {pool_text}, {pretrain_s / 60:.1f} min\n")
    head = f"| run (echo_vit_tiny, STF-Net) | test EF MAE, seeds {args.seeds} | per seed | R2 | fine-tune time |"
    print(head)
    print("|---|---|---|---|---|")
    for label, r in results.items():
        per_seed = " / ".join(f"{s['ef_mae']:.2f}" for s in r.get("seeds", [])) or "-"
        r2 = f"{r['ef_r2']:.2f}" if "ef_r2" in r else "-"
        secs = f"{r['seconds'] / 60:.1f} min" if "seconds" in r else "-"
        print(f"| {label} | {r['ef_mae']:.2f} | {per_seed} | {r2} | {secs} |")


if __name__ == "__main__":
    main()
