"""Checkpoints: weights in safetensors, the architecture as JSON beside them (OUT.json); a LoRA
fine-tuned model's adapters are in the weights and its rank, alpha and targets under "lora" in the JSON.

Loading into a mismatched configuration is an error that lists the offending tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedecho.models.config import ModelConfig
from fedecho.models.echo_vision_fm import EchoVisionFM
from fedecho.models.heads import is_stat_key
from fedecho.models.lora import LoraSpec, apply_lora, has_lora, lora_spec
from fedecho.storage.files import atomic_path, atomic_write_bytes


class CheckpointError(ValueError):
    pass


def config_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(model: EchoVisionFM, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write PATH (.safetensors) and PATH.json (config, whether it has a decoder, extra)."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": model.cfg.to_dict(), "decoder": model.decoder is not None, **(extra or {})}
    spec = lora_spec(model)
    if spec is not None and has_lora(model):  # LoRA fine-tuning: load_checkpoint wraps the encoder again
        meta["lora"] = spec.to_dict()
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "fedecho": "1"})
    atomic_write_bytes(config_path(path), json.dumps(meta, indent=2).encode())
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    cfg_file = config_path(path)
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: missing its config file {cfg_file.name}")
    return json.loads(cfg_file.read_text())


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> list[str]:
    """Load with shape checks that name every mismatch; returns keys the checkpoint lacked."""
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not is_stat_key(k))  # no statistics: the identity
    if wrong or (strict and (unexpected or missing)):
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
        if strict and unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:8])}")
        if strict and missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}")
        raise CheckpointError(f"{source} does not fit this model configuration ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    return missing


def load_checkpoint(path: str | Path, **overrides: Any) -> EchoVisionFM:
    """The model a checkpoint describes, with its weights. overrides change the config (e.g. tasks),
    in which case only the tensors that still fit are required to be present."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["config"])
    if overrides:
        cfg = cfg.replace(**overrides)
    model = EchoVisionFM(cfg, decoder=bool(meta.get("decoder", True)) and not overrides.get("tasks"))
    if meta.get("lora"):
        try:
            apply_lora(model, LoraSpec.from_dict(meta["lora"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its LoRA description {meta['lora']!r} is not usable ({e})") from e
    state = load_file(str(path))
    if overrides:
        state = {k: v for k, v in state.items() if k in model.state_dict()}
    load_state(model, state, str(path), strict=not overrides)
    return model
