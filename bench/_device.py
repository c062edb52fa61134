"""The step benches' --device option (not a bench itself): cpu, as the CPU figures were measured, or
cuda, where training runs as fedecho's engine runs it there (bf16 autocast, `fedecho.train.engine`).

On CUDA kernels run asynchronously, so every clock read waits for them (`clock`), and the peak memory
is the caching allocator's (weights, optimiser state, activations), not the process's RSS. On CPU all
of this is what the benches did before: a bare perf_counter, fp32.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedecho.device import autocast, pick_device, synchronize


def parse_device(name: str) -> torch.device:
    """argparse type: a torch device this machine has (a clear usage error, not a traceback later)."""
    try:
        device = pick_device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: the benches measure on cpu or cuda (cuda:N for one GPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", type=parse_device, default="cpu",
        help="cpu (fp32) or cuda (bf16 autocast as fedecho's engine, synchronised timing, allocator peak memory)",
    )  # fmt: skip


def compute_dtype(device: torch.device) -> str:
    """The dtype the engine's forward computes in on this device (what `autocast` turns on), e.g. bfloat16."""
    with autocast(device):
        if torch.is_autocast_enabled(device.type):
            return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
    return "float32"


def clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (on CPU: perf_counter)."""
    synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """The CUDA allocator's peak since `reset_peak_memory` (CUDA only: on CPU the benches use RSS)."""
    return torch.cuda.max_memory_allocated(device) / 2**20
