"""The Echo-Vision-FM model family: VideoMAE encoder (+ decoder for pre-training), STF-Net or
max-pool fusion, and task heads, in one module so a checkpoint carries a whole phase's model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedecho.models.config import ModelConfig
from fedecho.models.heads import Heads
from fedecho.models.registry import register_model
from fedecho.models.stfnet import MaxPoolFusion, STFNet
from fedecho.models.videomae import (
    VideoMAEDecoder,
    VideoMAEEncoder,
    init_weights,
    random_mask,
    reconstruction_loss,
    tube_mask,
)


class EchoVisionFM(nn.Module):
    """encoder -> (decoder: masked reconstruction) | (fusion -> heads: tasks).

    - `forward_features(video)`: encoder tokens (B, N, C) of an unmasked video in [0, 1];
    - `forward_pretrain(video, mask=None)`: (loss, reconstruction, mask);
    - `forward(video, frame_index=None)`: {task: head output}.
    """

    def __init__(self, cfg: ModelConfig, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = VideoMAEEncoder(cfg)
        self.decoder = VideoMAEDecoder(cfg) if decoder else None
        if cfg.tasks:
            if cfg.fusion == "stf":
                self.fusion: nn.Module = STFNet(
                    cfg.embed_dim, cfg.grid, cfg.stf_hidden, cfg.tubelet_size, cfg.num_frames, cfg.stf_norm
                )
            else:
                self.fusion = MaxPoolFusion(cfg.embed_dim)
            self.heads = Heads(self.fusion.out_dim, cfg.tasks, cfg.head, cfg.stf_norm)  # with target statistics
        else:
            self.fusion = None
            self.heads = nn.ModuleDict()
        for part in (self.encoder, self.decoder, self.fusion):  # heads keep make_head's neutral start
            if part is not None:
                part.apply(init_weights)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise LR decay: stem, each encoder block, encoder norm;
        everything else (decoder, STF-Net, heads) gets the full learning rate."""
        return {
            "stem": r"^encoder\.patch_embed",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))],
        }

    def compile_regions(self, **options: Any) -> None:
        """torch.compile each transformer block and the fusion in place (parameter names unchanged): each
        region sees fixed shapes, and the mask's data-dependent gathers stay eager between them."""
        blocks = [*self.encoder.blocks, *(self.decoder.blocks if self.decoder is not None else [])]
        for region in [*blocks, *([self.fusion] if self.fusion is not None else [])]:
            region.compile(**options)

    def make_mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        fn = tube_mask if self.cfg.mask_type == "tube" else random_mask
        return fn(batch, self.cfg.grid, self.cfg.mask_ratio, generator)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video)

    def forward_pretrain(
        self, video: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.decoder is None:
            raise RuntimeError("this model has no decoder (built for fine-tuning only)")
        if mask is None:
            mask = self.make_mask(video.shape[0], generator).to(video.device)
        pred = self.decoder(self.encoder(video, mask), mask)
        return reconstruction_loss(pred, video, mask, self.cfg), pred, mask

    def forward(self, video: torch.Tensor, frame_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.fusion is None:
            raise RuntimeError("this model has no task heads; create it with tasks=[...]")
        z = self.fusion(self.encoder(video), frame_index)
        return self.heads(z)  # type: ignore[no-any-return]  # regression outputs de-standardised (heads.py)


def _config(**kw) -> ModelConfig:
    return ModelConfig(**kw)


@register_model
def echo_vit_tiny(**overrides) -> ModelConfig:
    """Fast CPU tests and phantom runs: 112 px, 16 frames, 128 wide x 4 deep (about 0.8 M encoder params)."""
    return _config(name="echo_vit_tiny", img_size=112, embed_dim=128, depth=4, num_heads=4,
                   decoder_dim=64, decoder_depth=2, decoder_heads=2, stf_hidden=128).replace(**overrides)  # fmt: skip


@register_model
def echo_vit_small(**overrides) -> ModelConfig:
    """VideoMAE-S (384/12/6, decoder 192/4/3) at EchoNet's 112 px."""
    return _config(name="echo_vit_small", img_size=112, embed_dim=384, depth=12, num_heads=6,
                   decoder_dim=192, decoder_depth=4, decoder_heads=3, stf_hidden=512).replace(**overrides)  # fmt: skip


@register_model
def echo_vit_base(**overrides) -> ModelConfig:
    """The paper's: ViT-B/16 (768/12/12), 224 px, 16 frames, decoder 384 x 4 (encoder about 86 M params)."""
    return _config(name="echo_vit_base", img_size=224, embed_dim=768, depth=12, num_heads=12,
                   decoder_dim=384, decoder_depth=4, decoder_heads=6, stf_hidden=1024).replace(**overrides)  # fmt: skip
