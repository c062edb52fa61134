"""One phantom cine: a sampled heart, imaged by a vendor, with its exact labels and tracings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from fedecho.synth.heart import Heart
from fedecho.synth.render import PixelGrid, Scanner
from fedecho.synth.vendors import Vendor


@dataclass(frozen=True)
class Tracing:
    """Long axis (2, 2) and chords (20, 2, 2) in pixel coordinates (x=col, y=row)."""

    frame: int
    axis: np.ndarray
    chords: np.ndarray


@dataclass(frozen=True)
class PhantomVideo:
    frames: np.ndarray  # (T, H, W) uint8, the sector image only
    fps: float
    heart: Heart
    grid: PixelGrid
    ed_frame: int
    es_frame: int
    edv: float  # mL, method of discs at the ED frame
    esv: float  # mL, method of discs at the ES frame
    es_tracing: Tracing
    ed_tracing: Tracing

    @property
    def ef(self) -> float:
        """Ejection fraction in percent, from the traced volumes."""
        return 100.0 * (self.edv - self.esv) / self.edv


def sample_heart(vendor: Vendor, rng: np.random.Generator, n_frames_hint: int = 0) -> Heart:
    """Draw one patient: EF from the site's mix, a dilated LV when EF is low, random anatomy."""
    ef = vendor.sample_ef(rng)
    edv = float(np.exp(rng.normal(math.log(100.0), 0.2)) * (1.0 + 1.4 * max(0.0, 0.5 - ef)))
    edv = float(np.clip(edv, 55.0, 230.0))
    hr = float(np.clip(rng.normal(vendor.heart_rate, 9.0), 48.0, 120.0))
    systole = 0.52 - 0.0022 * hr + rng.normal(0.0, 0.015)
    systole = round(systole * vendor.fps) / vendor.fps  # end-systole falls on a frame
    beat_frames = 60.0 / hr * vendor.fps
    t_ed = int(rng.integers(0, max(1, int(beat_frames * 0.5)))) / vendor.fps  # ED on a frame
    return Heart(
        edv=edv,
        ef=ef,
        aspect=float(rng.uniform(3.1, 3.7)),
        tilt=float(rng.uniform(0.04, 0.26)),
        apex=(float(rng.uniform(0.5, 1.3)), float(rng.uniform(1.4, 2.3))),
        wall=float(rng.uniform(0.8, 1.2)),
        rv_scale=float(rng.uniform(0.6, 0.85)),
        rv_fac=float(rng.uniform(0.2, 0.5)),
        la_scale=float(rng.uniform(0.85, 1.2)),
        la_fill=float(rng.uniform(0.08, 0.22)),
        heart_rate=hr,
        systole=systole,
        t_ed=t_ed,
        breath=(float(rng.uniform(0.0, 0.25)), float(rng.uniform(3.0, 5.0)), float(rng.uniform(0, 2 * math.pi))),
        myo_echo=float(rng.uniform(0.25, 0.45)),
    )


def vary_acquisition(vendor: Vendor, heart: Heart, rng: np.random.Generator) -> tuple[Vendor, Heart]:
    """Per-video acquisition, as sonographers vary it: depth, sector width, gain, compression,
    noise and speckle settings, and the probe's position and angle (the heart's place in the sector).

    Real cines of one scanner differ this much from study to study; labels do not change (EF is a
    ratio of traced volumes), so this is nuisance variation a model has to learn to ignore.
    """
    depth = vendor.depth * float(rng.uniform(0.85, 1.2))
    vendor = dataclasses.replace(
        vendor,
        depth=depth,
        half_angle=vendor.half_angle + math.radians(float(rng.uniform(-5.0, 5.0))),
        gain=vendor.gain * float(np.exp(rng.uniform(-0.45, 0.45))),
        dynamic_range=vendor.dynamic_range * float(np.exp(rng.uniform(-0.7, 0.7))),
        noise=vendor.noise * float(np.exp(rng.uniform(-0.7, 0.7))),
        speckle=vendor.speckle * float(np.exp(rng.uniform(-0.35, 0.35))),
    )
    ax, ay = heart.apex
    heart = dataclasses.replace(
        heart,
        apex=(ax + float(rng.uniform(-0.7, 0.7)), ay + float(rng.uniform(-0.3, 1.0))),
        tilt=heart.tilt + float(rng.uniform(-0.12, 0.12)),
    )
    return vendor, heart


def make_video(
    vendor: Vendor,
    rng: np.random.Generator,
    height: int = 112,
    width: int = 112,
    max_frames: int = 128,
    vary: bool = False,
) -> PhantomVideo:
    """Render one cine of 1.6-2.4 beats (at most max_frames) with its ED/ES tracings; with vary,
    each video also gets its own acquisition settings and probe position (vary_acquisition)."""
    heart = sample_heart(vendor, rng)
    if vary:
        vendor, heart = vary_acquisition(vendor, heart, rng)
    grid = PixelGrid.for_sector(height, width, vendor.depth)
    beats = float(rng.uniform(1.6, 2.4))
    n = math.ceil(beats * heart.beat * vendor.fps)
    ed = round(heart.t_ed * vendor.fps)
    es = ed + round(heart.systole * vendor.fps)
    n = int(min(max(n, es + 2), max(max_frames, es + 2)))
    scanner = Scanner(heart, vendor, grid, rng)
    frames = np.empty((n, height, width), dtype=np.uint8)
    for i in range(n):
        frames[i] = np.round(scanner.frame(i / vendor.fps) * 255.0).astype(np.uint8)

    def trace(frame: int, c: float) -> tuple[Tracing, float]:
        st = heart.state_at_contraction(c, frame / vendor.fps)
        axis, chords = st.chords()
        return Tracing(frame, grid.to_pixels(axis), grid.to_pixels(chords)), st.volume()

    ed_tr, edv = trace(ed, 0.0)
    es_tr, esv = trace(es, 1.0)
    return PhantomVideo(frames, vendor.fps, heart, grid, ed, es, edv, esv, es_tr, ed_tr)
