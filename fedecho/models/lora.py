"""LoRA fine-tuning of the encoder (peft): low-rank adapters beside the encoder blocks' linear layers.

With `[finetune] lora_rank = r` the pre-trained encoder stays as it is and each targeted linear layer
W (timm's attention `qkv`, `proj` and MLP `fc1`, `fc2` by default) computes W x + (alpha / r) B A x, with A
(r x in) and B (out x r) trained; B starts at zero, so before training the model is the pre-trained one.
Only the adapters, the fusion (STF-Net) and the heads train, so in a federation only they travel each
round and the frozen encoder reaches a site once. At rank 8 the adapters are 1.4 % of echo_vit_base's
encoder (4.7 of 345 MB in fp32); with max-pool fusion a round's bytes are then 1.4 % of full fine-tuning's,
while STF-Net (506 MB at echo_vit_base) keeps them at 60 %.

State-dict names are peft's, with the adapter named "default":
    encoder.blocks.0.attn.qkv.weight  ->  encoder.blocks.0.attn.qkv.base_layer.weight   (frozen)
                                          encoder.blocks.0.attn.qkv.lora_A.default.weight (r, in)
                                          encoder.blocks.0.attn.qkv.lora_B.default.weight (out, r)
`to_lora_state` maps a plain (pre-trained) state onto those names, `to_plain_state` the other way, and
`merge_lora` folds the adapters into a plain model for export. A checkpoint of a LoRA model records its
`LoraSpec` beside the config (`fedecho.models.checkpoint`), so `load_checkpoint` rebuilds it.

peft is imported only where LoRA is used (it imports transformers: seconds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fedecho.models.echo_vision_fm import EchoVisionFM

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")  # timm Block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2
ADAPTER = "default"  # peft's adapter name, part of every adapter's state-dict key
ADAPTER_MARK = (".lora_A.", ".lora_B.")  # in a state-dict key: an adapter tensor
BASE = ".base_layer."  # in a state-dict key: a wrapped layer's frozen weight or bias


@dataclass(frozen=True)
class LoraSpec:
    """Which encoder layers get adapters, of which rank and scale (alpha / rank)."""

    rank: int
    alpha: float = 0.0  # 0: the rank (scaling 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, not {self.rank}")
        if not self.alpha >= 0:
            raise ValueError(f"LoRA alpha must be >= 0 (0: the rank), not {self.alpha}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target layer name")

    @property
    def scaling(self) -> float:
        return (self.alpha or self.rank) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(int(d["rank"]), float(d.get("alpha", 0.0)), tuple(d.get("targets", DEFAULT_TARGETS)))


def phase_spec(phase: Any) -> LoraSpec | None:
    """The LoRA of a run file's phase section (PhaseSection or FedPhaseSection); None when lora_rank is 0."""
    rank = int(getattr(phase, "lora_rank", 0))
    if rank <= 0:
        return None
    return LoraSpec(rank, float(phase.lora_alpha), tuple(phase.lora_targets))


def check_lora(cfg: Any, where: str) -> None:
    """[pretrain] and [finetune] lora_* fields of a run file (local `RunConfig`, or a federated file's `local`),
    each mistake a ConfigError naming the field."""
    from fedecho._toml import ConfigError, did_you_mean
    from fedecho.models.registry import model_config

    for name in ("pretrain", "finetune"):
        p = getattr(cfg, name)
        if p.lora_rank < 0:
            raise ConfigError(f"{where}: [{name}].lora_rank must be >= 0 (0: off), not {p.lora_rank}")
        if not p.lora_alpha >= 0:  # also NaN
            raise ConfigError(f"{where}: [{name}].lora_alpha must be >= 0 (0: the rank), not {p.lora_alpha}")
    pre = cfg.pretrain
    for key, off in (("lora_rank", 0), ("lora_alpha", 0.0), ("lora_targets", list(DEFAULT_TARGETS))):
        if getattr(pre, key) != off:
            raise ConfigError(
                f"{where}: [pretrain].{key} applies to fine-tuning only (pre-training trains the whole encoder)"
            )
    p = cfg.finetune
    if not p.lora_rank:
        return
    if p.freeze_encoder:
        raise ConfigError(
            f"{where}: [finetune].lora_rank = {p.lora_rank} contradicts [finetune].freeze_encoder = true (LoRA "
            "trains adapters inside the encoder; a frozen encoder trains nothing there): set one of them"
        )
    if not p.lora_targets:
        default = ", ".join(DEFAULT_TARGETS)
        raise ConfigError(f"{where}: [finetune].lora_targets must name at least one layer (default: {default})")
    from fedecho.models.videomae import VideoMAEEncoder

    with torch.device("meta"):  # nothing allocated: the layer names only
        encoder = VideoMAEEncoder(model_config(cfg.model_name, **cfg.model_overrides))
    linears = sorted({n.split(".")[-1] for n in _block_linears(encoder)})
    for i, target in enumerate(p.lora_targets):
        if not target_layers(encoder, [target])[target]:
            raise ConfigError(
                f"{where}: [finetune].lora_targets[{i}] {target!r} names no linear layer of the encoder blocks"
                f"{did_you_mean(target, linears)}; their names: {', '.join(linears)}"
            )


def _matches(name: str, target: str) -> bool:
    """peft's rule for a target given by name: the module's full name, or its last dotted components."""
    return name == target or name.endswith("." + target)


def target_layers(encoder: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """target -> the encoder's linear layers in its transformer blocks it names (full names within the encoder).
    Only the blocks' nn.Linear layers qualify: the tubelet embedding (`patch_embed.proj`, also a "proj") is a
    convolution applied to gathered tubelets, which a LoRA convolution could not follow."""
    linears = _block_linears(encoder)
    return {t: [n for n in linears if _matches(n, t)] for t in targets}


def _block_linears(encoder: nn.Module) -> list[str]:
    return [n for n, m in encoder.named_modules() if re.match(r"blocks\.\d+\.", n) and type(m) is nn.Linear]


def has_lora(model: nn.Module) -> bool:
    """Whether the model carries LoRA adapters (from its tensors' names: no peft import)."""
    return any(is_adapter_key(k) for k in model.state_dict())


def is_adapter_key(key: str) -> bool:
    return any(mark in key for mark in ADAPTER_MARK)


def lora_spec(model: nn.Module) -> LoraSpec | None:
    """The spec a model was wrapped with (set by `apply_lora`)."""
    return getattr(model, "lora_spec", None)


def apply_lora(model: EchoVisionFM, spec: LoraSpec | None) -> EchoVisionFM:
    """Wrap the model's encoder with LoRA adapters in place (peft); returns the model. None: unchanged.

    Adapter A is drawn from torch's global generator (peft's Kaiming-uniform), B is zero. Only the adapters
    are left trainable in the encoder; fusion and heads are untouched (`set_trainable` decides per phase)."""
    if spec is None:
        return model
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    layers = target_layers(model.encoder, spec.targets)
    unmatched = [t for t, hits in layers.items() if not hits]
    if unmatched:
        raise ValueError(f"LoRA target(s) {', '.join(map(repr, unmatched))} name no linear layer of the encoder")
    from peft import LoraConfig, inject_adapter_in_model

    names = sorted({n for hits in layers.values() for n in hits})
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=names, lora_dropout=0.0, bias="none"
    )
    inject_adapter_in_model(config, model.encoder, adapter_name=ADAPTER)
    model.lora_spec = spec  # type: ignore[assignment]  (a plain attribute: checkpoints record it)
    return model


def lora_key_map(model: nn.Module) -> dict[str, str]:
    """Plain state-dict key -> the LoRA model's key, for every wrapped layer's weight and bias."""
    out = {}
    for k in model.state_dict():
        if BASE in k:
            out[k.replace(BASE, ".")] = k
    return out


def to_lora_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state (e.g. a pre-trained encoder) under the LoRA model's names; keys the model already has,
    and every key of a plain model, are kept as they are."""
    mapping = lora_key_map(model)
    return {mapping.get(k, k): v for k, v in state.items()}


def to_plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state under plain names, adapters dropped (they are not folded in: see `merge_lora`)."""
    return {k.replace(BASE, "."): v for k, v in state.items() if not is_adapter_key(k)}


def frozen_base_keys(model: nn.Module) -> list[str]:
    """The LoRA model's encoder tensors that do not train (everything in the encoder but the adapters)."""
    return [k for k in model.state_dict() if k.startswith("encoder.") and not is_adapter_key(k)]


@torch.no_grad()
def merge_lora(model: EchoVisionFM) -> EchoVisionFM:
    """A plain model equal to the LoRA model (W + scaling B A folded into each wrapped layer): for export, or
    to start a later fine-tuning from; the LoRA model itself is left unchanged."""
    from fedecho.models.echo_vision_fm import EchoVisionFM

    spec = lora_spec(model)
    if spec is None or not has_lora(model):
        raise ValueError("the model has no LoRA adapters to merge")
    state = model.state_dict()
    merged = to_plain_state(state)
    for key in state:
        if key.endswith(f".lora_A.{ADAPTER}.weight"):
            layer = key[: -len(f".lora_A.{ADAPTER}.weight")]
            a, b = state[key].float(), state[f"{layer}.lora_B.{ADAPTER}.weight"].float()
            w = merged[f"{layer}.weight"]
            merged[f"{layer}.weight"] = (w.float() + spec.scaling * (b @ a)).to(w.dtype)
    plain = EchoVisionFM(model.cfg, decoder=model.decoder is not None)
    plain.load_state_dict(merged)
    return plain.to(next(model.parameters()).device)


__all__ = [
    "DEFAULT_TARGETS",
    "LoraSpec",
    "apply_lora",
    "check_lora",
    "frozen_base_keys",
    "has_lora",
    "is_adapter_key",
    "lora_key_map",
    "lora_spec",
    "merge_lora",
    "phase_spec",
    "target_layers",
    "to_lora_state",
    "to_plain_state",
]
