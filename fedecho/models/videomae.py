"""VideoMAE: tubelet embedding, fixed sinusoidal positions, tube/random masking, encoder on
visible tokens only, a light decoder, and MSE on masked tokens against per-patch normalised
pixels. Parameter layout follows VideoMAE so published weights import unchanged.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from fedecho.models.config import ModelConfig


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed sin-cos table (n_position, dim), exactly as the reference defines it."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(dim)[None, :]
    angles = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)


def tubelets(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> a view (B, T', H', W', C, tubelet, patch, patch): one entry per token, no copy,
    so a mask can gather just the tokens it needs (the visible ones to embed, the masked ones to predict)."""
    b, c, t, h, w = video.shape
    x = video.view(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7)


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, tubelet*patch*patch*C), tokens in (t, h, w) order, C last."""
    x = tubelets(video, tubelet, patch)
    return x.permute(0, 1, 2, 3, 5, 6, 7, 4).reshape(x.shape[0], -1, math.prod(x.shape[4:]))


def norm_pix(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Normalise pixels along `dim` to mean 0 and unbiased std 1 (+ 1e-6): VideoMAE's per-patch target."""
    centred = p - p.mean(dim=dim, keepdim=True)  # two passes: about 4x faster on CPU than torch.var_mean
    var = centred.square().sum(dim=dim, keepdim=True) / (p.shape[dim] - 1)
    return centred / (var.sqrt() + 1e-6)


def normalized_targets(video01: torch.Tensor, tubelet: int, patch: int, channels: int) -> torch.Tensor:
    """Per-patch, per-channel normalised pixels (mean 0, unbiased std 1, + 1e-6), VideoMAE's target."""
    p = patchify(video01, tubelet, patch)
    b, n, d = p.shape
    return norm_pix(p.reshape(b, n, d // channels, channels), dim=-2).reshape(b, n, d)


def tube_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean (B, N), True = masked; one spatial mask repeated over every time slot."""
    t, h, w = grid
    n_masked = round(ratio * h * w)
    noise = torch.rand(batch, h * w, generator=generator)
    order = noise.argsort(dim=1)
    spatial = torch.zeros(batch, h * w, dtype=torch.bool)
    spatial.scatter_(1, order[:, :n_masked], True)
    return spatial.unsqueeze(1).expand(batch, t, h * w).reshape(batch, t * h * w)


def random_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean (B, N), True = masked; independent positions over space and time."""
    n = grid[0] * grid[1] * grid[2]
    n_masked = round(ratio * n)
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_masked], True)
    return mask


def _blocks(dim: int, depth: int, heads: int, cfg: ModelConfig, eps: float, drop_path: float) -> nn.ModuleList:
    norm = functools.partial(nn.LayerNorm, eps=eps)  # timm passes device/dtype to norm_layer
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear
    blocks = [
        Block(dim, heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm, drop_path=rates[i])
        for i in range(depth)
    ]
    for blk in blocks:
        blk.attn.fused_attn = cfg.attention == "sdpa"  # timm's switch between SDPA and the written-out product
    return nn.ModuleList(blocks)


class TubeletConv(nn.Conv3d):
    """VideoMAE's tubelet Conv3d (kernel = stride, so its weights import unchanged) applied as one matmul to
    gathered tubelets (B, N, C, tubelet, patch, patch) -> (B, N, D): a strided convolution's weight gradient
    is far slower on CPU, and only the tokens the encoder will see are embedded. Its own type (not Conv3d)
    makes Opacus compute its per-sample gradients generically (functorch) from the batch-first input."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(patches.flatten(2), self.weight.flatten(1), self.bias)


class TubeletEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = TubeletConv(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class VideoMAEEncoder(nn.Module):
    """ViT over tubelet tokens; runs on visible tokens only when given a mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = TubeletEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.embed_dim)[None], persistent=False)
        # (C, 1, 1, 1): broadcast over gathered tubelets (..., C, tubelet, patch, patch)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(-1, 1, 1, 1), persistent=False)
        self.blocks = _blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg, cfg.norm_eps, cfg.drop_path)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.encoder_norm else nn.Identity()

    def check_input(self, video: torch.Tensor) -> None:
        c = self.cfg
        want = (c.in_chans, c.num_frames, c.img_size, c.img_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"expected video (B, {', '.join(map(str, want))}) in [0, 1], got {tuple(video.shape)}")

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """video (B, C, T, H, W) in [0, 1]; mask (B, N) True = hidden. Returns (B, N_visible, D)."""
        self.check_input(video)
        c = self.cfg
        b = video.shape[0]
        tokens = tubelets(video, c.tubelet_size, c.patch_size)  # a view: gather before any copy
        pos = self.pos_embed.to(video.dtype)
        if mask is None:
            patches = tokens.reshape(b, c.num_tokens, *tokens.shape[4:])
        else:
            keep = ~mask
            patches = tokens[keep.view(tokens.shape[:4])].reshape(b, -1, *tokens.shape[4:])
            pos = pos.expand(b, -1, -1)[keep].reshape(b, -1, pos.shape[-1])
        x = self.patch_embed((patches - self.mean) / self.std) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VideoMAEDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.decoder_dim)[None], persistent=False)
        self.blocks = _blocks(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg, cfg.norm_eps, 0.0)
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=cfg.decoder_norm_eps)
        self.head = nn.Linear(cfg.decoder_dim, cfg.patch_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruct the masked tokens (B, N_masked, patch_dim), in the mask's token order."""
        x = self.encoder_to_decoder(visible)
        b, _, d = x.shape
        pos = self.pos_embed.expand(b, -1, -1).to(x.dtype)
        pos_vis = pos[~mask].reshape(b, -1, d)
        pos_mask = pos[mask].reshape(b, -1, d)
        x = torch.cat([x + pos_vis, self.mask_token.to(x.dtype) + pos_mask], dim=1)
        for blk in self.blocks:
            x = blk(x)
        n_masked = pos_mask.shape[1]
        return self.head(self.norm(x[:, -n_masked:]))


def reconstruction_loss(
    pred: torch.Tensor, video01: torch.Tensor, mask: torch.Tensor, cfg: ModelConfig
) -> torch.Tensor:
    """MSE between predicted and target pixels of the masked tokens only (only those are gathered)."""
    with torch.no_grad():
        tokens = tubelets(video01, cfg.tubelet_size, cfg.patch_size)
        target = tokens[mask.view(tokens.shape[:4])]  # (B * N_masked, C, tubelet, patch, patch)
        if cfg.norm_pix_loss:
            target = norm_pix(target.flatten(2), dim=-1).view_as(target)
        target = target.permute(0, 2, 3, 4, 1).reshape(pred.shape)  # C last, as patchify and the head
    return nn.functional.mse_loss(pred.float(), target.float())


def init_weights(module: nn.Module) -> None:
    """VideoMAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
