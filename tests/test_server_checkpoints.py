"""The server's round checkpoints: retention keeps the newest per phase, and resume still finds one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedecho.fl.config import load_fed_run_config
from fedecho.models import create_model
from fedecho.server.checkpoints import latest_valid, prune_checkpoints, write_checkpoint
from fedecho.storage import Store, store_url
from fedecho.train.config import ConfigError


def test_only_the_newest_checkpoints_of_each_phase_are_kept(tmp_path: Path) -> None:
    store = Store(store_url(tmp_path / "state"))
    run = store.create_run("r", "")
    folder = tmp_path / "state" / "checkpoints"
    model = create_model("echo_vit_tiny", decoder=False, tasks=["ef"])
    state = {"m": np.zeros(3, np.float32)}
    for r in (1, 2):
        write_checkpoint(store, folder, run, "pretrain", r, model, state)
        assert prune_checkpoints(store, folder, run, "pretrain", keep=2) == []
    for r in (1, 2, 3, 4):
        write_checkpoint(store, folder, run, "finetune", r, model, {"m": np.full(3, r, np.float32)})
        prune_checkpoints(store, folder, run, "finetune", keep=2)
    assert [(c.phase, c.round) for c in store.checkpoints(run)] == [
        ("finetune", 4), ("finetune", 3), ("pretrain", 2), ("pretrain", 1)
    ]  # fmt: skip
    files = sorted(p.name for p in (folder / "run-0001").iterdir())
    assert not [f for f in files if f.startswith(("finetune-round-0001", "finetune-round-0002"))]
    assert len(files) == 4 * 3  # model, its config and the strategy state of each kept round
    # a crash after the records went but before the files did: the next prune sweeps the files
    write_checkpoint(store, folder, run, "finetune", 5, model, state)
    store.remove_checkpoint(run, "finetune", 3)
    assert (folder / "run-0001" / "finetune-round-0003.safetensors").is_file()
    assert prune_checkpoints(store, folder, run, "finetune", keep=2) == [3]
    # resume falls back over a corrupt newest checkpoint to the one retention kept
    (folder / "run-0001" / "finetune-round-0005.strategy.safetensors").write_bytes(b"torn")
    ck, _, sstate = latest_valid(store, run, "finetune")  # type: ignore[misc]
    assert ck.round == 4 and sstate["m"].tolist() == [4, 4, 4]
    # keep = 0 keeps every round
    assert prune_checkpoints(store, folder, run, "pretrain", keep=0) == []
    assert len([c for c in store.checkpoints(run) if c.phase == "pretrain"]) == 2
    store.close()


def test_keep_checkpoints_must_not_be_negative(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[run]\nkeep_checkpoints = -1\n[pretrain]\nrounds = 1\n")
    with pytest.raises(ConfigError, match=r"\[run\].keep_checkpoints"):
        load_fed_run_config(path)
