"""Model configuration as data (timm-style): one frozen dataclass, serialised next to weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines an Echo-Vision-FM model's architecture.

    Input videos are (B, 3, T, H, W) in [0, 1]; the model normalises them with mean/std
    (ImageNet's, as VideoMAE and Echo-Vision-FM's processors do) before the tubelet embedding.
    """

    name: str = "custom"
    img_size: int = 224
    num_frames: int = 16
    patch_size: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # VideoMAE: q and v biases (a k bias cannot change attention)
    norm_eps: float = 1e-6
    encoder_norm: bool = True  # final LayerNorm on encoder tokens (VideoMAE pre-training)
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    decoder_norm_eps: float = 1e-5
    mask_ratio: float = 0.85
    mask_type: Literal["tube", "random"] = "tube"
    norm_pix_loss: bool = True
    drop_path: float = 0.0
    # "sdpa": F.scaled_dot_product_attention (fused kernels); "explicit": softmax(QK^T / sqrt(d)) V written out
    # (timm's non-fused path: attention maps can be inspected, any backend can differentiate it).
    attention: Literal["sdpa", "explicit"] = "sdpa"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Fine-tuning: fusion and heads.
    fusion: Literal["stf", "max"] = "stf"
    stf_hidden: int = 1024  # gated-attention hidden size L
    head: Literal["linear", "mlp"] = "linear"
    # Normalisation in STF-Net's bottlenecks and the MLP head: "batch" (the paper) or "group" (GroupNorm, with
    # STF-Net's per-slice convolutions kept batch-first), which DP-SGD needs: per-sample gradients cannot
    # pass through statistics shared across a batch.
    stf_norm: Literal["batch", "group"] = "batch"
    tasks: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            problems.append(f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_dim % self.decoder_heads:
            problems.append(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio must be in [0, 1), not {self.mask_ratio}")
        if self.mask_type not in ("tube", "random"):
            problems.append(f"mask_type must be 'tube' or 'random', not {self.mask_type!r}")
        if self.attention not in ("sdpa", "explicit"):
            problems.append(f"attention must be 'sdpa' or 'explicit', not {self.attention!r}")
        if self.fusion not in ("stf", "max"):
            problems.append(f"fusion must be 'stf' or 'max', not {self.fusion!r}")
        if self.head not in ("linear", "mlp"):
            problems.append(f"head must be 'linear' or 'mlp', not {self.head!r}")
        if self.stf_norm not in ("batch", "group"):
            problems.append(f"stf_norm must be 'batch' or 'group', not {self.stf_norm!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        return (
            self.num_frames // self.tubelet_size,
            self.img_size // self.patch_size,
            self.img_size // self.patch_size,
        )

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"], d["tasks"] = list(self.mean), list(self.std), list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("mean", "std", "tasks"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        for key in ("mean", "std", "tasks"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        return dataclasses.replace(self, **overrides)
