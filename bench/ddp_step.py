"""Data-parallel pre-training steps: the step time on N devices against one, at the same global batch.

    python bench/ddp_step.py --device cuda [--devices 1,2,4,8] [--model echo_vit_base] [--batch 16] [--steps 10]
    python bench/ddp_step.py --device cpu --devices 1,2 --model echo_vit_tiny --batch 4   # gloo, a CPU figure

Each arm runs `fedecho.train.job.TrainingJob` as `fedecho train --devices N` does (one process per device,
DistributedDataParallel, the batch split over the devices) on a small phantom, for two epochs of --steps steps;
the second epoch's time per step counts (the first compiles kernels, fills caches and starts the loader). The
default --devices is 1 and every GPU torch sees (on CPU: 1,2). The ratio is one device's step time over N
devices': N means perfect scaling. Writes bench/results/ddp_step.json (with the `table` rows `make bench`
collects). The target: at least 0.8 N on GPUs (there is none on CPUs, whose processes share the same cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from _device import add_device_option, compute_dtype
from _table import table_row

from fedecho.data import Augment, ClipSampler, EchoVideoDataset, FrameCache, open_source
from fedecho.models import create_model
from fedecho.synth import synthesize
from fedecho.train import TrainingJob
from fedecho.train.config import PhaseSection

TARGET = 0.8  # of perfect scaling, on GPUs


def step_seconds(model_name: str, train: EchoVideoDataset, batch: int, steps: int, devices: int, device: str) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, decoder=True)
    cfg = PhaseSection(epochs=2, batch_size=batch, lr=1e-4, warmup_epochs=0)
    job = TrainingJob(model, "pretrain", cfg, train, seed=0, workers="auto", device=device, steps=2 * steps)
    result = job.run(devices)
    last = result.epochs[-1]
    return last.seconds / last.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="echo_vit_base")
    p.add_argument("--devices", default="", help="device counts, comma-separated (default: 1 and all)")
    p.add_argument("--batch", type=int, default=16, help="the global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up steps)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: torch's default)")
    p.add_argument("--work", type=Path, default=Path("bench/work/ddp_step"))
    add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("bench/results/ddp_step.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.device.type
    visible = torch.cuda.device_count() if kind == "cuda" else 2
    counts = [int(d) for d in args.devices.split(",") if d.strip()] or sorted({1, visible})
    model_cfg = create_model(args.model, decoder=False).cfg
    videos = max(args.batch * args.steps // 8 * 10, 24)  # the training split (80 %) holds a phase's steps
    data = args.work / f"phantom-{videos}"
    if not (data / "FileList.csv").is_file():
        synthesize(data, videos=videos, sites=1, fmt="echonet", seed=0, max_frames=64, progress=False)
    train = EchoVideoDataset(
        open_source(data), "train", targets=(), sampler=ClipSampler(model_cfg.num_frames), size=model_cfg.img_size,
        cache=FrameCache(args.work / "cache"), augment=Augment(),
    )  # fmt: skip
    train.prepare(progress=False)
    rows: list[dict[str, Any]] = []
    for n in counts:
        seconds = step_seconds(args.model, train, args.batch, args.steps, n, kind)
        rows.append({"devices": n, "step_s": seconds, "clips_s": args.batch / seconds})
        print(f"{args.model} on {n} {kind} device(s): {seconds:.3f} s a step of {args.batch}", flush=True)
    one = next((r["step_s"] for r in rows if r["devices"] == 1), None)
    table = []
    for r in rows:
        r["speedup"] = one / r["step_s"] if one else None
        if r["devices"] > 1 and one:
            goal = TARGET * r["devices"]
            table.append(table_row(
                "Data-parallel", f"{args.model} pre-training step time, 1 {kind} / {r['devices']} {kind}s "
                f"(global batch {args.batch})", round(r["speedup"], 2), "x",
                f">= {goal:.1f}x" if kind == "cuda" else None, r["speedup"] >= goal if kind == "cuda" else None,
            ))  # fmt: skip
    summary = {"device": kind, "dtype": compute_dtype(args.device), "model": args.model, "batch": args.batch}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**summary, "steps": args.steps, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"\n| devices | s / step (global batch {args.batch}) | clips/s | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['step_s']:.3f} | {r['clips_s']:.1f} | {r['speedup'] or 0:.2f}x |")


if __name__ == "__main__":
    main()
