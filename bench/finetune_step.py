"""Fine-tuning step with STF-Net: eager against torch.compile, attention variants, and STF-Net's cost.

    python bench/finetune_step.py [--models echo_vit_small,echo_vit_tiny] [--steps 5] [--threads 1]

A step is fedecho's own: `Trainer.train_epoch` over one batch (forward through the encoder, STF-Net
and the EF head, MSE, backward, fused AdamW from timm's factory, LR schedule), fp32 on CPU; with
--device cuda on the GPU under the engine's bf16 autocast, its time synchronised with the GPU. Variants:
- eager: SDPA attention (F.scaled_dot_product_attention picks its fused CPU kernel), fusion "stf";
- compile: `EchoVisionFM.compile_regions()` (torch.compile of each transformer block and of STF-Net);
  the first step's time, less the steady step's, is the compile time (a fresh inductor cache per run);
- sdpa-math: the same model under `sdpa_kernel(SDPBackend.MATH)`, SDPA's unfused reference backend;
- explicit: the model option attention = "explicit" (softmax(QK^T / sqrt(d)) V written out);
- max: fusion = "max" (the encoder-only baseline): the gap to eager is STF-Net's cost.
Each model runs in its own subprocess, its variants side by side with their steps interleaved (the
machine is shared: a burst of load then slows every variant alike). Reports the median step time
over --steps after --warmup steps, and writes bench/results/finetune_step.json (with the aggregated
"table").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _device import add_device_option, compute_dtype
from _table import table_row

BATCH = {"echo_vit_tiny": 2, "echo_vit_small": 2, "echo_vit_base": 1}
VARIANTS = ("eager", "compile", "sdpa-math", "explicit", "max")


def build(model_name: str, variant: str, batch: int, device: torch.device) -> Callable[[], float]:
    """One variant's model and Trainer (same weights, same batch, both on the device); returns a function
    timing one step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fedecho.models import create_model
    from fedecho.train import Trainer
    from fedecho.train.config import PhaseSection

    overrides: dict[str, Any] = {"tasks": ["ef"], "fusion": "max" if variant == "max" else "stf"}
    if variant == "explicit":
        overrides["attention"] = "explicit"
    torch.manual_seed(0)
    model = create_model(model_name, decoder=False, **overrides)
    c = model.cfg
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(batch, 3, c.num_frames, c.img_size, c.img_size, generator=gen).to(device)
    info = {
        "ef": (30 + 40 * torch.rand(batch, generator=gen)).to(device),
        "frame_index": torch.arange(c.num_frames).repeat(batch, 1).to(device),
    }
    if variant == "compile":
        model.compile_regions()
    phase = PhaseSection(epochs=1, batch_size=batch, lr=1e-4, weight_decay=1e-5, betas=[0.9, 0.99])  # the paper's
    trainer = Trainer(model, "finetune", phase, steps_per_epoch=1, device=device)

    def step() -> float:
        backend = sdpa_kernel(SDPBackend.MATH) if variant == "sdpa-math" else contextlib.nullcontext()
        with backend:
            return trainer.train_epoch([(video, info)]).seconds  # one batch: one step

    return step


def worker(
    model_name: str, variants: list[str], batch: int, warmup: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """All variants of one model in one process, their steps interleaved round-robin: a shared machine's
    load then falls on every variant alike. Returns each variant's first-step and median step seconds."""
    runs = {v: build(model_name, v, batch, device) for v in variants}
    first = {v: run() for v, run in runs.items()}  # the compile variant compiles here
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(warmup + steps):
        for v, run in runs.items():
            t = run()
            if i >= warmup:
                times[v].append(t)
    return {
        v: {"first_step_s": first[v], "s_per_step": statistics.median(times[v]), "times": times[v]} for v in variants
    }


def run_worker(model_name: str, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", model_name, ",".join(variants), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--device", str(args.device)]
    with tempfile.TemporaryDirectory() as cache:  # a cold inductor cache: the compile time is the real one
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TORCHINDUCTOR_CACHE_DIR": cache}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{model_name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


LABELS = {
    "compile": "torch.compile",
    "sdpa-math": "SDPA math backend",
    "explicit": "explicit softmax(QK^T)V",
    "max": "fusion=max (no STF-Net)",
}


row = functools.partial(table_row, "Fine-tune step")  # this group sets no targets


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        m, v = r["model"], r["variants"]
        out.append(row(f"eager step (SDPA, STF-Net), {m}", round(v["eager"]["s_per_step"], 3), "s/step"))
        out += [
            row(f"{label} vs eager speed, {m}", round(r["speedup"][k], 2), "x") for k, label in LABELS.items() if k in v
        ]
        if "compile" in v:
            out.append(row(f"torch.compile compile time, {m}", round(r["compile_s"], 1), "s"))
        if "max" in v:
            out.append(row(f"STF-Net share of the eager step, {m}", round(100 * r["stf_share"]), "%"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="echo_vit_small,echo_vit_tiny", help="comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="1: a shared machine's load cannot stall a thread team")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANTS"), help=argparse.SUPPRESS)
    add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("bench/results/finetune_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        name, variants = args.worker
        print(json.dumps(worker(name, variants.split(","), BATCH.get(name, 2), args.warmup, args.steps, args.device)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "eager" not in variants:
        p.error(f"variants must include eager and be among {', '.join(VARIANTS)} (unknown: {unknown})")
    rows: list[dict[str, Any]] = []
    for name in [m for m in args.models.split(",") if m]:
        res = run_worker(name, variants, args)
        eager = res["eager"]["s_per_step"]
        row: dict[str, Any] = {"model": name, "batch": BATCH.get(name, 2), "variants": res}
        row["speedup"] = {v: eager / r["s_per_step"] for v, r in res.items()}
        if "compile" in res:
            row["compile_s"] = res["compile"]["first_step_s"] - res["compile"]["s_per_step"]
        if "max" in res:
            row["stf_share"] = (eager - res["max"]["s_per_step"]) / eager
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{v} {r['s_per_step']:.3f} s" for v, r in res.items()), flush=True)
    dtype = compute_dtype(args.device)
    summary = {
        "device": str(args.device), "dtype": dtype,
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "load_average": os.getloadavg(),
        "rows": rows, "table": table_rows(rows),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\n{args.device}, {args.threads} threads, {dtype}, median of {args.steps} steps after {args.warmup} "
        "warm-up steps\n"
    )
    print("| model | variant | s/step | vs eager | first step s |")
    print("|---|---|---|---|---|")
    for r in rows:
        for v, res in r["variants"].items():
            print(
                f"| {r['model']} (batch {r['batch']}) | {v} | {res['s_per_step']:.3f} | {r['speedup'][v]:.2f}x "
                f"| {res['first_step_s']:.1f} |"
            )
    for r in rows:
        extra = []
        if "compile_s" in r:
            extra.append(f"compile time {r['compile_s']:.1f} s")
        if "stf_share" in r:
            extra.append(f"STF-Net {100 * r['stf_share']:.0f} % of the eager step")
        if extra:
            print(f"\n{r['model']}: " + "; ".join(extra))


if __name__ == "__main__":
    main()
