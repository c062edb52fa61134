"""The server's per-round checkpoints: the global model and the strategy's own state.

After every round both are written atomically (temp file, fsync, rename) and recorded in the
store with their sha256. On resume the newest checkpoint whose files still hash to what the store
recorded is used; a mismatch is reported as an event and the previous round's checkpoint is tried.
Only the newest `[run].keep_checkpoints` of each phase are kept: with FedAdam's two moments a
checkpoint is three times the model, every round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedecho.models import EchoVisionFM, load_checkpoint, save_checkpoint
from fedecho.models.checkpoint import config_path
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
    model = folder / f"run-{run_id:04d}" / f"{phase}-round-{server_round:04d}{MODEL_SUFFIX}"
    return RoundCheckpoint(phase, server_round, model, strategy_path(model))


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
    store.add_checkpoint(run_id, phase, server_round, str(ck.model), pair_sha256(ck))
    return ck


def prune_checkpoints(store: Store, folder: Path, run_id: int, phase: str, keep: int) -> list[int]:
    """Drop all but the newest `keep` checkpoints of a phase (0: keep all); returns the rounds dropped.

    The records go first, then the files, so a crash in between leaves only files no record points
    to; they are older than every kept round and the next prune sweeps them."""
    if keep <= 0:
        return []
    rows = [r for r in store.checkpoints(run_id) if r.phase == phase]  # newest first
    if not rows[:keep]:
        return []
    for row in rows[keep:]:
        store.remove_checkpoint(run_id, phase, row.round)
    oldest_kept = min(r.round for r in rows[:keep])
    dropped = []
    for model in sorted((folder / f"run-{run_id:04d}").glob(f"{phase}-round-*{MODEL_SUFFIX}")):
        if model.name.endswith(STRATEGY_SUFFIX):
            continue
        server_round = int(model.name[len(phase) + len("-round-") :].removesuffix(MODEL_SUFFIX))
        if server_round < oldest_kept:
            for f in (model, strategy_path(model), config_path(model)):
                f.unlink(missing_ok=True)
            dropped.append(server_round)
    return dropped


def strategy_path(model: Path) -> Path:
    return Path(str(model)[: -len(MODEL_SUFFIX)] + STRATEGY_SUFFIX)


def pair_sha256(ck: RoundCheckpoint) -> str:
    """One hash for the checkpoint: over the model file's and the strategy file's sha256."""
    return hashlib.sha256((file_sha256(ck.model) + file_sha256(ck.strategy)).encode()).hexdigest()


def latest_valid(
    store: Store, run_id: int, phase: str
) -> tuple[RoundCheckpoint, EchoVisionFM, dict[str, np.ndarray]] | None:
    """The newest checkpoint of a phase whose files match their recorded hash."""
    for row in store.checkpoints(run_id):  # newest first
        if row.phase != phase:
            continue
        ck = RoundCheckpoint(phase, row.round, Path(row.path), strategy_path(Path(row.path)))
        missing = [str(p) for p in (ck.model, ck.strategy) if not p.is_file()]
        if missing:
            problem = f"{', '.join(missing)} missing"
        elif pair_sha256(ck) != row.sha256:
            problem = f"{ck.model} or its strategy state does not match the recorded sha256"
        else:
            return ck, load_checkpoint(ck.model), load_numpy(str(ck.strategy))
        store.add_event(run_id, "checkpoint-invalid", f"{phase} round {row.round}: {problem}; using the one before")
    return None


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}
