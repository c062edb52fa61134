"""Clip sampling, frame geometry, augmentation and normalisation, shared by every source.

Two sampling conventions:
- EchoNet-Dynamic: `length` frames taken every `period` frames from a start;
- Echo-Vision-FM: `length` (16) frames spread evenly over the whole video (`period=None`).
Both define a finite set of distinct clips per video; training draws one at random, test-time
averaging uses all of them (optionally thinned to `max_clips`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class ClipSampler:
    length: int = 16
    period: int | None = None  # None: evenly spaced over the whole video

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"clip length must be >= 1, not {self.length}")
        if self.period is not None and self.period < 1:
            raise ValueError(f"clip period must be >= 1 or None, not {self.period}")

    def n_clips(self, n_frames: int) -> int:
        """Number of distinct clips of a video with n_frames frames."""
        if n_frames < 1:
            raise ValueError("a video needs at least one frame")
        if self.period is None:
            return max(1, n_frames // self.length)
        span = (self.length - 1) * self.period + 1
        return max(1, n_frames - span + 1)

    def indices(self, n_frames: int, clip: int) -> np.ndarray:
        """Frame indices of clip number `clip`; short videos loop (echo is periodic)."""
        if not 0 <= clip < self.n_clips(n_frames):
            raise IndexError(f"clip {clip} out of range for {n_frames} frames")
        if self.period is None:
            step = n_frames / self.length
            if step < 1:
                return np.floor(np.arange(self.length) * step).astype(np.int64)
            return np.floor(clip + np.arange(self.length) * step).astype(np.int64)
        return (clip + np.arange(self.length) * self.period) % n_frames

    def random_clip(self, n_frames: int, rng: np.random.Generator) -> int:
        return int(rng.integers(0, self.n_clips(n_frames)))

    def test_clips(self, n_frames: int, max_clips: int | None = None) -> list[int]:
        """All clips, or max_clips of them evenly spread, for test-time averaging."""
        n = self.n_clips(n_frames)
        if max_clips is None or n <= max_clips:
            return list(range(n))
        return sorted({round(x) for x in np.linspace(0, n - 1, max_clips)})


def fit_square(frame: np.ndarray, size: int) -> np.ndarray:
    """Letterbox one frame (H, W[, C]) onto a black square, then resize to size x size."""
    h, w = frame.shape[:2]
    side = max(h, w)
    if h != w:
        pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)]
        pad += [(0, 0)] * (frame.ndim - 2)
        frame = np.pad(frame, pad)
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        frame = cv2.resize(frame, (size, size), interpolation=interp)
    return frame


def to_uint8_gray_or_rgb(frames: np.ndarray, tolerance: int = 8, fraction: float = 1e-3) -> np.ndarray:
    """(T, H, W, 3) whose channels agree (grayscale echo in RGB clothing) becomes (T, H, W).

    Lossy YBR compression leaves small chroma differences; a video counts as grayscale when
    fewer than `fraction` of its pixels differ between channels by more than `tolerance`.
    Colour Doppler and other colour content stays RGB.
    """
    if frames.ndim == 4 and frames.shape[-1] == 3:
        if frames.dtype == np.uint8:
            gray = gray_frames(frames, tolerance, fraction)
            return frames if gray is None else gray
        r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
        spread = np.maximum(_absdiff(r, g), _absdiff(r, b))
        if np.count_nonzero(spread > tolerance) < fraction * spread.size:
            # The rounded channel mean in integers: (r + g + b) / 3 is never a half, so this is round().
            total = r.astype(np.uint16) + g + b + 1
            return (total // 3).astype(np.uint8)
        return frames
    if frames.ndim == 4 and frames.shape[-1] == 1:
        return frames[..., 0]
    return frames


def gray_frames(frames: Sequence[np.ndarray], tolerance: int = 8, fraction: float = 1e-3) -> np.ndarray | None:
    """to_uint8_gray_or_rgb's test and conversion for uint8 (H, W, 3) frames (an array or a list, all one
    shape): the (T, H, W) grayscale video, or None when it is colour.

    Frame by frame (each stays in cache through the test and the mean), and it stops at the first frame
    that takes the count of differing pixels to the limit: a colour video is rarely read to its end."""
    n = len(frames)
    h, w = frames[0].shape[:2] if n else (0, 0)
    limit = fraction * (n * h * w)
    gray = np.empty((n, h, w), np.uint8)
    total = np.empty((h, w), np.uint16)
    over = 0
    if over >= limit:  # no pixels: colour, as to_uint8_gray_or_rgb decides
        return None
    for i in range(n):
        r, g, b = cv2.split(np.ascontiguousarray(frames[i]))
        over += np.count_nonzero(cv2.max(cv2.absdiff(r, g), cv2.absdiff(r, b)) > tolerance)
        if over >= limit:
            return None
        # The rounded channel mean in integers: (r + g + b) / 3 is never a half, so this is round().
        np.add(r, g, out=total, dtype=np.uint16)
        total += b
        total += 1
        np.floor_divide(total, 3, out=total)
        gray[i] = total
    return gray


def _absdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two uint8 arrays, in uint8 (no widening copy of a whole video)."""
    return np.maximum(a, b) - np.minimum(a, b)


def clip_tensor(frames: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Gather frames (T, H, W[, 3]) uint8 into a float clip (3, L, H, W) in [0, 1].

    A grayscale clip is one channel viewed three times (stride 0): converted, augmented and normalised
    once per pixel rather than three times; batching (or normalisation) makes the three real channels."""
    x = torch.from_numpy(np.ascontiguousarray(frames[indices]))
    if x.ndim == 3:
        return x.float().div_(255.0).expand(3, *x.shape)
    return x.permute(3, 0, 1, 2).float().div_(255.0)


def test_time_clips(
    frames: np.ndarray,
    sampler: ClipSampler,
    max_clips: int | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of a video for test-time averaging: (N, 3, L, H, W) and frame indices (N, L)."""
    n = len(frames)
    indices = [sampler.indices(n, c) for c in sampler.test_clips(n, max_clips)]
    video = torch.stack([normalize(clip_tensor(frames, i), mean, std) for i in indices])
    return video, torch.from_numpy(np.stack(indices))


@dataclass(frozen=True)
class Augment:
    """Training augmentation for echo clips; geometry-preserving, so labels stay exact.

    Random translation by zero padding and cropping (EchoNet's pad=12 at 112 px), a small
    rotation about the sector apex, and gain/gamma jitter (scanner settings differ).
    """

    pad: int = 8
    rotate_deg: float = 8.0
    gain: float = 0.15
    gamma: float = 0.15

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        c, t, h, w = clip.shape
        shared = c > 1 and clip.stride(0) == 0  # grayscale (clip_tensor): augment the one real channel
        x = (clip[:1] if shared else clip).reshape(1, -1, h, w)  # every frame and channel: one image stack
        angle = float(rng.uniform(-self.rotate_deg, self.rotate_deg)) if self.rotate_deg > 0 else None
        sy, sx = (int(v) - self.pad for v in rng.integers(0, 2 * self.pad + 1, size=2)) if self.pad > 0 else (0, 0)
        if angle is not None:
            a = math.radians(angle)
            # Rotate about the top centre (the transducer, normalised (0, -1)); frames are square.
            cos, sin = math.cos(a), math.sin(a)
            theta = torch.tensor([[[cos, -sin, -sin], [sin, cos, cos - 1.0]]], dtype=clip.dtype)
            grid = torch.nn.functional.affine_grid(theta, [1, 1, h, w], align_corners=False)  # one grid for all
            # Translating the rotated image = translating the grid; pixels shifted in from outside read far
            # outside the image, which grid_sample's zero padding makes exactly 0, as padding did.
            if sy or sx:
                grid = _shift(grid.movedim(-1, 1), sy, sx, fill=-4.0).movedim(1, -1)
            x = torch.nn.functional.grid_sample(x, grid, align_corners=False)
        elif sy or sx:
            x = _shift(x, sy, sx)
        if self.gain > 0 or self.gamma > 0:
            g = float(rng.uniform(1 - self.gain, 1 + self.gain))
            gm = float(rng.uniform(1 - self.gamma, 1 + self.gamma))
            x = x.clamp(0, 1).pow_(gm).mul_(g).clamp_(0, 1)
        x = x.reshape(-1, t, h, w)
        return x.expand(c, t, h, w) if shared else x.contiguous()


def _shift(x: torch.Tensor, sy: int, sx: int, fill: float = 0.0) -> torch.Tensor:
    """out[..., y, x] = x[..., y + sy, x + sx], `fill` outside: translation by padding and cropping, one copy."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    out[..., max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)] = x[
        ..., max(0, sy) : h - max(0, -sy), max(0, sx) : w - max(0, -sx)
    ]
    return out


def normalize(clip: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    if mean is None or std is None:
        return clip
    return (clip - mean.view(3, 1, 1, 1)) / std.view(3, 1, 1, 1)


def channel_stats(videos: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] over all frames of the given videos (EchoNet's recipe)."""
    n = 0
    s = np.zeros(3)
    s2 = np.zeros(3)
    for v in videos:
        x = v.reshape(-1, 3) if v.ndim == 4 else np.repeat(v.reshape(-1, 1), 3, axis=1)
        x = x.astype(np.float64) / 255.0
        n += x.shape[0]
        s += x.sum(0)
        s2 += (x * x).sum(0)
    if n == 0:
        raise ValueError("no frames to compute normalisation statistics from")
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)
