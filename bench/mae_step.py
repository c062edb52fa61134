"""Masked-autoencoder training step: fedecho against transformers' VideoMAEForPreTraining at the same configuration.

    python bench/mae_step.py [--models echo_vit_small,echo_vit_base] [--steps 5] [--rounds 3] [--threads 1]

Both arms build the same architecture (encoder, decoder 192/4/3 or 384/4/6, norm-pix loss, tube
masking at 0.85 with the same masks) and time a full step: forward, backward and the same torch
AdamW (fused, as fedecho's Trainer uses it). Each (model, arm) runs in its own subprocess so its
peak memory is its own: max RSS (getrusage) minus the max RSS after imports, i.e. weights,
optimiser state and activations. The arms alternate for `--rounds` rounds and each keeps its
fastest round's median step: the machine is shared, and another job's burst should not decide a
ratio. fedecho's FLOPs per step are counted with torch.utils.flop_counter and divided by its step
time; the fp32 matrix-multiply peak is the best timed square torch.mm in the same run, same threads.
With --device cuda both arms run on the GPU under the engine's bf16 autocast, the peak memory is the
CUDA allocator's and the matmul peak is bf16 torch.mm on the GPU (the JSON's "device" and "dtype").
Writes bench/results/mae_step.json (with the aggregated "table"). The targets: at least 1.3x
transformers' speed, at most 0.8x its peak memory, at least 60 % of the matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from _device import add_device_option, clock, compute_dtype, peak_memory_mb, reset_peak_memory
from _table import table_row
from torch.utils.flop_counter import FlopCounterMode

from fedecho.device import autocast

BATCH = {"echo_vit_tiny": 2, "echo_vit_small": 2, "echo_vit_base": 1}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
MATMUL_SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}  # a GPU needs large products to fill its cores
DTYPE_LABEL = {"float32": "fp32", "bfloat16": "bf16"}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_gflops(device: torch.device, repeats: int = 20) -> float:
    """Best torch.mm throughput over square sizes, on the device in the dtype the step computes in (fp32 on
    CPU, bf16 on CUDA): the ceiling a dense step could reach here. Taken again between models: on a shared
    machine the best sample is the machine's, not the load's."""
    dtype = getattr(torch, compute_dtype(device))
    best_rate = 0.0
    for n in MATMUL_SIZES[device.type]:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b)
        for _ in range(repeats):
            t0 = clock(device)
            torch.mm(a, b)
            best_rate = max(best_rate, 2 * n**3 / (clock(device) - t0) / 1e9)
    return best_rate


def build_arm(model_name: str, arm: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model and a step closure (forward under the engine's autocast, backward) on fixed random clips
    and masks, all on the device."""
    from fedecho.models import create_model, model_config
    from fedecho.models.videomae import random_mask, tube_mask

    mc = model_config(model_name)
    video = torch.rand(batch, 3, mc.num_frames, mc.img_size, mc.img_size, generator=torch.Generator().manual_seed(0))
    masking = tube_mask if mc.mask_type == "tube" else random_mask  # as EchoVisionFM.make_mask
    mask = masking(batch, mc.grid, mc.mask_ratio, torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    if arm == "fedecho":
        fm = create_model(model_name, decoder=True).to(device)  # only this arm's model is built in its process
        clips = video.to(device)

        def step() -> torch.Tensor:
            with autocast(device):
                loss, _, _ = fm.forward_pretrain(clips, mask)
            loss.backward()
            return loss

        return fm, step
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    hf_cfg = VideoMAEConfig(
        image_size=mc.img_size, patch_size=mc.patch_size, num_frames=mc.num_frames, tubelet_size=mc.tubelet_size,
        hidden_size=mc.embed_dim, num_hidden_layers=mc.depth, num_attention_heads=mc.num_heads,
        intermediate_size=int(mc.embed_dim * mc.mlp_ratio), decoder_hidden_size=mc.decoder_dim,
        decoder_num_hidden_layers=mc.decoder_depth, decoder_num_attention_heads=mc.decoder_heads,
        decoder_intermediate_size=int(mc.decoder_dim * mc.mlp_ratio), norm_pix_loss=mc.norm_pix_loss,
        use_mean_pooling=not mc.encoder_norm, qkv_bias=mc.qkv_bias, layer_norm_eps=mc.norm_eps,
    )  # fmt: skip
    hf = VideoMAEForPreTraining(hf_cfg).to(device)
    pixels = ((video.permute(0, 2, 1, 3, 4) - IMAGENET_MEAN) / IMAGENET_STD).to(device)  # the processor's, untimed

    def hf_step() -> torch.Tensor:
        with autocast(device):
            loss = hf(pixel_values=pixels, bool_masked_pos=mask).loss
        loss.backward()
        return loss

    return hf, hf_step


def worker(model_name: str, arm: str, batch: int, warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """One (model, arm) in a fresh process: median step time, peak memory (CPU: RSS above imports; CUDA: the
    allocator's peak), FLOPs per step."""
    import fedecho.models  # noqa: F401  (imports count as baseline, not as the arm's memory)

    if arm == "transformers":
        import transformers  # noqa: F401
    base = max_rss_mb()
    reset_peak_memory(device)
    model, step = build_arm(model_name, arm, batch, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), fused=True)
    times = []
    for i in range(warmup + steps):
        t0 = clock(device)
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(clock(device) - t0)
    peak = peak_memory_mb(device) if device.type == "cuda" else max_rss_mb() - base
    with FlopCounterMode(display=False) as counter:
        step()
    opt.zero_grad(set_to_none=True)
    out: dict[str, Any] = {
        "s_per_step": statistics.median(times), "times": times, "peak_mb": peak,
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }  # fmt: skip
    if arm == "transformers":
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return out


def run_worker(model_name: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", model_name, arm, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--device", str(args.device)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{model_name}/{arm} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def best_of_rounds(model_name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Alternate the arms for args.rounds rounds; each arm keeps its fastest round (all medians kept)."""
    runs: dict[str, list[dict[str, Any]]] = {"fedecho": [], "transformers": []}
    for _ in range(args.rounds):
        for arm, results in runs.items():
            results.append(run_worker(model_name, arm, args))
    best = {}
    for arm, results in runs.items():
        best[arm] = min(results, key=lambda r: r["s_per_step"])
        best[arm]["round_medians"] = [r["s_per_step"] for r in results]
        best[arm]["round_peaks_mb"] = [r["peak_mb"] for r in results]
        best[arm]["peak_mb"] = statistics.median(best[arm]["round_peaks_mb"])  # the allocator varies a little
    return best


def table_rows(rows: list[dict[str, Any]], dtype: str) -> list[dict[str, Any]]:
    """The aggregated benchmark table's rows (item, measure, value, unit, target, met)."""
    item = "MAE step"
    peak = f"{DTYPE_LABEL.get(dtype, dtype)} matmul peak"
    out = []
    for r in rows:
        m = r["model"]
        out += [
            table_row(item, f"speed vs transformers, {m}", round(r["speed_ratio"], 2), "x", ">= 1.3x",
                      r["speed_ratio"] >= 1.3),
            table_row(item, f"peak memory vs transformers, {m}", round(r["memory_ratio"], 2), "x", "<= 0.8x",
                      r["memory_ratio"] <= 0.8),
            table_row(item, f"fedecho FLOP/s as % of the {peak}, {m}", round(100 * r["fraction_of_matmul_peak"]),
                      "%", ">= 60 %", r["fraction_of_matmul_peak"] >= 0.6),
        ]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="echo_vit_small,echo_vit_base", help="comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm (the fastest is kept)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="1: a shared machine's load cannot stall a thread team")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "ARM"), help=argparse.SUPPRESS)
    add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("bench/results/mae_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        name, arm = args.worker
        print(json.dumps(worker(name, arm, BATCH.get(name, 2), args.warmup, args.steps, args.device)))
        return
    models = [m for m in args.models.split(",") if m]
    dtype = compute_dtype(args.device)
    peak_samples = [matmul_gflops(args.device)]
    rows: list[dict[str, Any]] = []
    for name in models:
        arms = best_of_rounds(name, args)
        fe, hf = arms["fedecho"], arms["transformers"]
        achieved = fe["gflop_per_step"] / fe["s_per_step"]
        rows.append({
            "model": name, "batch": BATCH.get(name, 2), "fedecho": fe, "transformers": hf,
            "speed_ratio": hf["s_per_step"] / fe["s_per_step"], "memory_ratio": fe["peak_mb"] / hf["peak_mb"],
            "fedecho_gflops": achieved,
        })  # fmt: skip
        print(f"{name}: fedecho {fe['s_per_step']:.3f} s, transformers {hf['s_per_step']:.3f} s", flush=True)
        peak_samples.append(matmul_gflops(args.device))
    peak_gflops = max(peak_samples)
    for r in rows:
        r["fraction_of_matmul_peak"] = r["fedecho_gflops"] / peak_gflops
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": str(args.device), "dtype": dtype,
        "peak_memory": "CUDA allocator peak" if args.device.type == "cuda" else "max RSS above imports",
        "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "load_average": os.getloadavg(),
        "matmul_peak_gflops": peak_gflops, "matmul_sizes": MATMUL_SIZES[args.device.type],
        "matmul_samples_gflops": peak_samples, "rows": rows, "table": table_rows(rows, dtype),
    }  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    sizes = " and ".join(map(str, MATMUL_SIZES[args.device.type]))
    print(
        f"\n{args.device}, {args.threads} threads, {DTYPE_LABEL.get(dtype, dtype)} matmul peak {peak_gflops:.1f} "
        f"GFLOP/s (best square torch.mm, {sizes})\n"
    )
    print(
        "| model | fedecho s/step | transformers s/step | speed ratio | fedecho peak MB | transformers peak MB "
        "| memory ratio | fedecho GFLOP/s | % of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fe, hf = r["fedecho"], r["transformers"]
        print(
            f"| {r['model']} (batch {r['batch']}) | {fe['s_per_step']:.3f} | {hf['s_per_step']:.3f} "
            f"| {r['speed_ratio']:.2f}x | {fe['peak_mb']:.0f} | {hf['peak_mb']:.0f} | {r['memory_ratio']:.2f}x "
            f"| {r['fedecho_gflops']:.1f} | {100 * r['fraction_of_matmul_peak']:.0f} % |"
        )
    print("\nTargets: speed ratio >= 1.3x, memory ratio <= 0.8x, >= 60 % of the matmul peak.")


if __name__ == "__main__":
    main()
