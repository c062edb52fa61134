"""Is the data path fast enough, and how does it scale with loader workers? Clips per second the cache loader
delivers with 0, 1 and 2 worker processes, against clips per second pre-training consumes.

    OMP_NUM_THREADS=2 python bench/data_loader.py [--videos 24] [--models echo_vit_tiny,echo_vit_small] \
        [--workers 0,1,2] [--device cpu]

Synthesises a small phantom into --work (once), decodes it into the FrameCache (prepare), then
times the training loader (EchoVideoDataset's train split with Augment, the model's clip length and
size, `fedecho.train.loader.train_batches` as training builds it: one DataLoader whose workers persist
between epochs, pinned memory on CUDA) in clips/s for each --workers count, and Trainer pre-training
steps (batch --batch, 0.85 tube masking, AdamW) on already-loaded clips in clips/s. With --device cuda
training runs on the GPU under the engine's bf16 autocast (its clips copied there in each step, as in
training; the loader stays on the CPU). The measurements alternate --rounds times and the median of
each counts, so a machine shared with other work slows all alike. Every worker count delivers the same
clips (draws depend on seed, epoch and video only): checked on the first epoch. Writes
bench/results/data_loader.json (with the `table` rows `make bench` collects). The target: the loader
at least 10x training, with the workers "auto" gives on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import torch
from _device import add_device_option, compute_dtype
from _table import table_row

from fedecho.data import open_source
from fedecho.data.cache import FrameCache
from fedecho.data.clips import Augment, ClipSampler
from fedecho.data.dataset import EchoVideoDataset
from fedecho.models import create_model
from fedecho.synth import synthesize
from fedecho.train import Trainer
from fedecho.train.config import PhaseSection
from fedecho.train.loader import auto_workers, train_batches

TARGET = 10


class LoaderTimer:
    """One training loader with `workers` persistent workers; each call times whole epochs of it."""

    def __init__(self, train: EchoVideoDataset, batch: int, workers: int, device: str, min_clips: int):
        self.batches = train_batches(train, batch, 0, workers=workers, device=device)
        self.first = [video for video, _ in self.batches.epoch(0)]  # warm-up: page cache, workers started
        self.min_clips, self.epoch = min_clips, 1

    def __call__(self) -> float:
        clips = 0
        t0 = time.perf_counter()
        while clips < self.min_clips:
            for video, _ in self.batches.epoch(self.epoch):
                clips += video.shape[0]
            self.epoch += 1
        return clips / (time.perf_counter() - t0)


def pretrainer(
    model_name: str, train: EchoVideoDataset, batch: int, steps: int, device: torch.device
) -> Callable[[], float]:
    """Clips/s of `steps` pre-training steps on clips already in memory, so only the model's cost counts."""
    torch.manual_seed(0)
    model = create_model(model_name, decoder=True)
    batches = list(train_batches(train, batch, 0).epoch(0))
    full = [b for b in batches if b[0].shape[0] == batch] or batches
    phase = PhaseSection(batch_size=batch, warmup_epochs=0, epochs=1)
    trainer = Trainer(model, "pretrain", phase, steps, device=device)
    trainer.train_epoch(full[:1], max_steps=1)  # warm-up

    def clips_per_s() -> float:
        res = trainer.train_epoch([full[i % len(full)] for i in range(steps)])
        return res.examples / res.seconds

    return clips_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--models", default="echo_vit_tiny,echo_vit_small", help="comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed training steps")
    p.add_argument("--min-clips", type=int, default=480, help="clips the loader must deliver while timed")
    p.add_argument("--rounds", type=int, default=3, help="alternating loader and training measurements")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads")
    p.add_argument("--work", type=Path, default=Path("bench/work/data_loader"))
    add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("bench/results/data_loader.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    cv2.setNumThreads(args.threads)
    data = args.work / f"phantom-{args.videos}"
    if not (data / "FileList.csv").is_file():
        synthesize(data, videos=args.videos, sites=1, fmt="echonet", seed=0, progress=False)
    source = open_source(data)
    scan = source.scan()
    cache = FrameCache(args.work / "cache")
    rows: list[dict[str, Any]] = []
    for name in [m for m in args.models.split(",") if m]:
        mc = create_model(name, decoder=False).cfg
        train = EchoVideoDataset(
            source, "train", targets=(), sampler=ClipSampler(mc.num_frames), size=mc.img_size,
            cache=cache, augment=Augment(), scan=scan,
        )  # fmt: skip
        t0 = time.perf_counter()
        train.prepare(progress=False)
        prepare_s = time.perf_counter() - t0
        train_rate = pretrainer(name, train, args.batch, args.steps, args.device)
        timers = {w: LoaderTimer(train, args.batch, w, str(args.device), args.min_clips) for w in workers}
        for w, timer in timers.items():  # the same clips with any number of workers
            assert all(torch.equal(a, b) for a, b in zip(timer.first, timers[workers[0]].first, strict=True)), w
        loads: dict[int, list[float]] = {w: [] for w in workers}
        consumes = []
        for _ in range(args.rounds):
            for w, timer in timers.items():
                loads[w].append(timer())
            consumes.append(train_rate())
        consume = statistics.median(consumes)
        for w in workers:
            load = statistics.median(loads[w])
            rows.append({
                "model": name, "frames": mc.num_frames, "size": mc.img_size, "train_videos": len(train),
                "workers": w, "prepare_s": prepare_s, "loader_clips_s": load, "train_clips_s": consume,
                "ratio": load / consume,
            })  # fmt: skip
            print(f"{name}: loader {load:.1f} clips/s with {w} workers, training {consume:.1f} clips/s", flush=True)
        del timers  # their workers end
    args.out.parent.mkdir(parents=True, exist_ok=True)
    auto = auto_workers(args.device, args.threads)
    summary = {
        "device": str(args.device), "dtype": compute_dtype(args.device),
        "videos": args.videos, "batch": args.batch, "workers": workers, "auto_workers": auto, "threads": args.threads,
    }  # fmt: skip
    table = [
        table_row("Data loader", f"cache loader clips/s ({r['workers']} workers) / {r['model']} pre-training clips/s "
                  f"(batch {args.batch})", round(r["ratio"], 1), "x", f">= {TARGET}x" if r["workers"] == auto else None,
                  r["ratio"] >= TARGET if r["workers"] == auto else None)
        for r in rows
    ]  # fmt: skip
    args.out.write_text(json.dumps({**summary, "rounds": args.rounds, "rows": rows, "table": table}, indent=2) + "\n")
    print(
        f"\n{args.videos} phantom videos, batch {args.batch}, {args.threads} threads (auto: {auto} workers), "
        f"training on {args.device}\n"
    )
    print("| model (clip) | workers | loader clips/s | pre-training clips/s | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} ({r['frames']} x {r['size']} px) | {r['workers']} | {r['loader_clips_s']:.1f} "
            f"| {r['train_clips_s']:.1f} | {r['ratio']:.1f}x |"
        )
    print(f"\nTarget: the loader delivers at least {TARGET}x the clips training consumes.")


if __name__ == "__main__":
    main()
