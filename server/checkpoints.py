"""The server's per-round checkpoints: the global model and the strategy's own state.

After every round both are written atomically (temp file, fsync, rename) and recorded in the
store with their sha256. On resume the newest checkpoint whose files still hash to what the store
recorded is used; a mismatch is reported as an event and the previous round's checkpoint is tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedecho.models import EchoVisionFM, load_checkpoint, save_checkpoint
from fedecho.storage import Store
from fedecho.storage.files import atomic_path, file_sha256

MODEL_SUFFIX = ".safetensors"
STRATEGY_SUFFIX = ".strategy.safetensors"


@dataclass
class RoundCheckpoint:
    phase: str
    round: int
    model: Path
    strategy: Path


def checkpoint_paths(folder: Path, run_id: int, phase: str, server_round: int) -> RoundCheckpoint:
    base = folder / f"run-{run_id:04d}" / f"{phase}-round-{server_round:04d}"
    return RoundCheckpoint(phase, server_round, base.with_suffix(MODEL_SUFFIX), Path(str(base) + STRATEGY_SUFFIX))


def write_checkpoint(
    store: Store,
    folder: Path,
    run_id: int,
    phase: str,
    server_round: int,
    model: EchoVisionFM,
    strategy_state: dict[str, np.ndarray],
) -> RoundCheckpoint:
    """Write both files atomically, then record them (a crash in between leaves an older round)."""
    ck = checkpoint_paths(folder, run_id, phase, server_round)
    ck.model.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, ck.model, {"run": run_id, "phase": phase, "round": server_round})
    with atomic_path(ck.strategy) as tmp:
        save_numpy(strategy_state, str(tmp))
    store.add_checkpoint(run_id, phase, server_round, str(ck.strategy), file_sha256(ck.strategy))
    store.add_checkpoint(run_id, phase, server_round, str(ck.model), file_sha256(ck.model))
    return ck


def latest_valid(store: Store, run_id: int, phase: str) -> tuple[RoundCheckpoint, EchoVisionFM, dict[str, np.ndarray]] | None:
    """The newest checkpoint of a phase whose model and strategy files match their recorded hashes."""
    rows = [r for r in store.checkpoints(run_id) if r.phase == phase]
    by_round: dict[int, dict[str, str]] = {}
    for r in rows:
        kind = "strategy" if r.path.endswith(STRATEGY_SUFFIX) else "model"
        by_round.setdefault(r.round, {}).setdefault(kind, r.path)
        by_round[r.round].setdefault(kind + "_sha", r.sha256)
    for server_round in sorted(by_round, reverse=True):
        entry = by_round[server_round]
        problem = ""
        for kind in ("model", "strategy"):
            path = entry.get(kind)
            if path is None:
                problem = f"no {kind} file recorded"
            elif not Path(path).is_file():
                problem = f"{path} is missing"
            elif file_sha256(Path(path)) != entry[kind + "_sha"]:
                problem = f"{path} does not match its recorded sha256"
            if problem:
                break
        if problem:
            store.add_event(run_id, "checkpoint-invalid", f"{phase} round {server_round}: {problem}; using the one before")
            continue
        model = load_checkpoint(entry["model"])
        state = load_numpy(entry["strategy"])
        return RoundCheckpoint(phase, server_round, Path(entry["model"]), Path(entry["strategy"])), model, state
    return None


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}
