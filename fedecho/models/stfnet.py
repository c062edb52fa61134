"""STF-Net: spatial-temporal fusion of encoder tokens (Echo-Vision-FM), and the max-pool baseline.

Tokens (B, N, C) are viewed as a (T', H', W') grid. The joint path adds a 3-D sinusoidal
position code, runs a 3-D residual bottleneck and pools all tokens by gated attention into a
"global" vector. The separate path runs a 2-D bottleneck per time slice, collapses each slice
with an H'xW' convolution, adds a temporal code built from the sampled frame indices and pools
over time into a "fine" vector. Output: both, concatenated (2C). Where the official code reshapes
with `view` in place of a permute, this implementation permutes explicitly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedecho.models.videomae import sinusoid_table


class GatedAttentionPool(nn.Module):
    """Ilse et al. 2018: a = softmax(w^T [tanh(Vx) * sigmoid(Ux)]), out = sum_i a_i x_i."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.w(torch.tanh(self.v(x)) * torch.sigmoid(self.u(x)))  # (B, N, 1)
        return (torch.softmax(a, dim=1) * x).sum(dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the channels (per sample: DP-SGD compatible)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Bottleneck(nn.Module):
    """1x1 C->C/2, norm, ReLU; 3x3 C/2->C/2, norm, ReLU; 1x1 C/2->C, norm; + input; ReLU (2-D or 3-D).

    norm "batch": BatchNorm (the paper). norm "group": GroupNorm, and with `per_slice` the 2-D block is
    written as 3-D convolutions with kernels (1, k, k) on (B, C, T, H, W), the same per-slice operation
    with the batch kept first (Opacus computes per-sample gradients layer by layer from batch-first inputs).
    ReLUs are in-place only with BatchNorm: Opacus' backward hooks forbid editing a hooked layer's output.
    """

    def __init__(self, dim: int, spatial_dims: int, norm: str = "batch", per_slice: bool = False):
        super().__init__()
        mid = dim // 2
        if norm == "batch":
            conv, bn = (nn.Conv3d, nn.BatchNorm3d) if spatial_dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
            k3: int | tuple[int, int, int] = 3
            pad: int | tuple[int, int, int] = 1
        else:
            conv, bn = (nn.Conv3d, group_norm) if spatial_dims == 3 or per_slice else (nn.Conv2d, group_norm)
            k3, pad = ((1, 3, 3), (0, 1, 1)) if per_slice else (3, 1)
        inplace = norm == "batch"
        self.body = nn.Sequential(
            conv(dim, mid, 1, bias=False),
            bn(mid),
            nn.ReLU(inplace=inplace),
            conv(mid, mid, k3, padding=pad, bias=False),
            bn(mid),
            nn.ReLU(inplace=inplace),
            conv(mid, dim, 1, bias=False),
            bn(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def sinusoid_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """(T, H, W, dim): thirds of the channels encode t, h and w (remainder to t)."""
    t, h, w = grid
    d_hw = (dim // 3) // 2 * 2
    d_t = dim - 2 * d_hw
    pt = sinusoid_table(t, d_t)[:, None, None, :].expand(t, h, w, d_t)
    ph = sinusoid_table(h, d_hw)[None, :, None, :].expand(t, h, w, d_hw)
    pw = sinusoid_table(w, d_hw)[None, None, :, :].expand(t, h, w, d_hw)
    return torch.cat([pt, ph, pw], dim=-1)


class STFNet(nn.Module):
    def __init__(
        self, dim: int, grid: tuple[int, int, int], hidden: int, tubelet: int, num_frames: int, norm: str = "batch"
    ):
        super().__init__()
        self.grid, self.tubelet, self.num_frames = grid, tubelet, num_frames
        _t, h, w = grid
        # GroupNorm models keep the batch first in the separate path (see Bottleneck): DP-SGD can train them.
        self.batch_first = norm == "group"
        self.register_buffer("pos3d", sinusoid_3d(grid, dim), persistent=False)
        self.joint = Bottleneck(dim, 3, norm)
        self.joint_pool = GatedAttentionPool(dim, hidden)
        self.separate = Bottleneck(dim, 2, norm, per_slice=self.batch_first)
        if self.batch_first:
            self.collapse: nn.Module = nn.Conv3d(dim, dim, kernel_size=(1, h, w))
        else:
            self.collapse = nn.Conv2d(dim, dim, kernel_size=(h, w))
        self.temporal = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.time_pool = GatedAttentionPool(dim, hidden)
        self.out_dim = 2 * dim

    def temporal_code(self, frame_index: torch.Tensor | None, batch: int, dim: int, device, dtype) -> torch.Tensor:
        """1-D sinusoid of the sampled frame indices, averaged in tubelet groups: (B, T', C)."""
        if frame_index is None:
            frame_index = torch.arange(self.num_frames, device=device).expand(batch, -1)
        idx = frame_index.to(device=device, dtype=torch.float64)
        j = torch.arange(dim, device=device, dtype=torch.float64)
        angles = idx[..., None] / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
        code = torch.where(j.long() % 2 == 0, torch.sin(angles), torch.cos(angles))
        code = code.reshape(batch, -1, self.tubelet, dim).mean(dim=2)
        return code.to(dtype)

    def forward(self, tokens: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = tokens.shape
        t, h, w = self.grid
        x = tokens.reshape(b, t, h, w, c)  # tokens are in (t, h, w) order
        # Joint 3-D path -> global vector.
        j = (x + self.pos3d.to(x.dtype)).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        j = self.joint(j).permute(0, 2, 3, 4, 1).reshape(b, n, c)
        global_vec = self.joint_pool(j)
        # Separate path: spatial per slice, then temporal -> fine vector.
        if self.batch_first:  # (B, C, T, H, W) through (1, k, k) kernels: the same per-slice operation
            s = self.collapse(self.separate(x.permute(0, 4, 1, 2, 3))).reshape(b, c, t).transpose(1, 2)
        else:
            s = x.permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w)  # (B*T, C, H, W)
            s = self.collapse(self.separate(s)).reshape(b, t, c)
        s = s + self.temporal(self.temporal_code(frame_index, b, c, s.device, s.dtype))
        fine_vec = self.time_pool(s)
        return torch.cat([global_vec, fine_vec], dim=1)


class MaxPoolFusion(nn.Module):
    """The encoder-only baseline: max over tokens (C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, tokens: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        return tokens.amax(dim=1)
