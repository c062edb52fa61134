"""Process-wide environment defaults, applied on first import of fedecho.

Privacy is the product: every library that could phone home is told not to, before it is
imported. Values the user set explicitly are kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

NO_TELEMETRY = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_DISABLED": "true",
    "MPLBACKEND": "Agg",
}

for _key, _value in NO_TELEMETRY.items():
    os.environ.setdefault(_key, _value)


def set_torch_threads(n: int | None = None) -> None:
    """Pin torch's intra-op threads (default: $FEDECHO_THREADS or all cores)."""
    import torch

    n = n or int(os.environ.get("FEDECHO_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)


def _apply(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: remove) environment variables for what starts inside, e.g. child processes that read them
    at start; the caller's values are restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    _apply(values)
    try:
        yield
    finally:
        _apply(saved)
