"""Clip sampling conventions, frame geometry, augmentation and normalisation statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedecho.data import Augment, ClipSampler, channel_stats, fit_square
from fedecho.data.clips import clip_tensor, to_uint8_gray_or_rgb


def test_echonet_length_and_period() -> None:
    s = ClipSampler(length=32, period=2)
    assert s.n_clips(100) == 100 - 63 + 1
    assert list(s.indices(100, 0)[:3]) == [0, 2, 4] and s.indices(100, 37)[-1] == 99
    with pytest.raises(IndexError):
        s.indices(100, 38)
    short = s.indices(20, 0)  # shorter than the span: loops around (echo is periodic)
    assert s.n_clips(20) == 1 and short.max() < 20 and list(short[:12]) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 0, 2]


def test_paper_evenly_spaced_sixteen() -> None:
    s = ClipSampler(length=16)
    idx = s.indices(160, 0)
    assert list(idx) == list(range(0, 160, 10))
    assert s.n_clips(160) == 10 and list(s.indices(160, 9)) == list(range(9, 160, 10))
    clips = {tuple(s.indices(173, c)) for c in range(s.n_clips(173))}
    assert len(clips) == s.n_clips(173)  # all distinct
    assert all(max(c) < 173 for c in clips) and all(np.all(np.diff(c) > 0) for c in clips)
    assert list(ClipSampler(16).indices(8, 0)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]


def test_test_clips_cap_is_spread_over_the_video() -> None:
    s = ClipSampler(8, 1)
    assert s.test_clips(20) == list(range(13))
    capped = s.test_clips(100, max_clips=5)
    assert capped[0] == 0 and capped[-1] == s.n_clips(100) - 1 and len(capped) == 5


def test_fit_square_letterboxes_then_resizes() -> None:
    frame = np.full((30, 60), 200, np.uint8)
    out = fit_square(frame, 60)
    assert out.shape == (60, 60)
    assert out[:15].max() == 0 and out[45:].max() == 0 and (out[15:45] == 200).all()
    assert fit_square(np.zeros((300, 400, 3), np.uint8), 112).shape == (112, 112, 3)


def test_gray_detection_and_clip_tensor() -> None:
    gray = np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8)
    rgb_gray = np.repeat(gray[..., None], 3, -1)
    assert to_uint8_gray_or_rgb(rgb_gray).shape == (4, 8, 8)
    colour = rgb_gray.copy()
    colour[:, :4, :4, 0] = 255  # a colour Doppler box
    assert to_uint8_gray_or_rgb(colour).shape == (4, 8, 8, 3)
    t = clip_tensor(gray, np.array([3, 1]))
    assert t.shape == (3, 2, 8, 8) and torch.allclose(t[1, 0], torch.from_numpy(gray[3]).float() / 255)


def test_augment_keeps_shape_and_is_reproducible() -> None:
    clip = torch.rand(3, 4, 32, 32)
    aug = Augment()
    a = aug(clip, np.random.default_rng(1))
    b = aug(clip, np.random.default_rng(1))
    c = aug(clip, np.random.default_rng(2))
    assert a.shape == clip.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    ident = Augment(pad=0, rotate_deg=0, gain=0, gamma=0)(clip, np.random.default_rng(0))
    assert torch.allclose(ident, clip)


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (5, 6, 6, 3), dtype=np.uint8), rng.integers(0, 255, (3, 6, 6), dtype=np.uint8)]
    mean, std = channel_stats(videos)
    pix = np.concatenate([videos[0].reshape(-1, 3), np.repeat(videos[1].reshape(-1, 1), 3, 1)]) / 255.0
    assert np.allclose(mean, pix.mean(0), atol=1e-6) and np.allclose(std, pix.std(0), atol=1e-6)
