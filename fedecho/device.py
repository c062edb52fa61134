"""Where training runs and in what precision: the engine's device policy, in a module light enough to
import before a memory baseline is taken (bench/mae_step.py) or in a process that trains nothing."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 is ~100x slower on these CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so a clock read without it
    times their launch, not their work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
