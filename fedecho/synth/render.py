"""Imaging of the phantom heart: a B-mode sector with speckle, attenuation and log compression.

Structures are painted back to front as echogenicity maps with soft (anti-aliased) edges, then
multiplied by a Rayleigh speckle field that lives on the polar beam grid (so it is elongated
laterally, like real speckle) and decorrelates partly from frame to frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from fedecho.synth.heart import Heart, HeartState, lv_profile
from fedecho.synth.vendors import Vendor

BLOOD = 0.002
TISSUE = 0.08
PERICARDIUM = 1.0
VALVE = 0.5


@dataclass(frozen=True)
class PixelGrid:
    """Maps pixel (row, col) centres to cm: x = x0 + col * scale, y = y0 + row * scale."""

    height: int
    width: int
    scale: float  # cm per pixel
    x0: float
    y0: float

    @classmethod
    def for_sector(cls, height: int, width: int, depth: float) -> PixelGrid:
        """Sector apex at the top centre; depth spans the image height (EchoNet-style crop)."""
        scale = depth / height
        return cls(height, width, scale, -(width - 1) / 2 * scale, 0.5 * scale)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        cols = self.x0 + np.arange(self.width) * self.scale
        rows = self.y0 + np.arange(self.height) * self.scale
        return np.meshgrid(cols, rows)

    def to_pixels(self, points_cm: np.ndarray) -> np.ndarray:
        """cm (..., 2) as (x, y) to pixel (..., 2) as (x=col, y=row)."""
        out = np.empty_like(points_cm, dtype=np.float64)
        out[..., 0] = (points_cm[..., 0] - self.x0) / self.scale
        out[..., 1] = (points_cm[..., 1] - self.y0) / self.scale
        return out


def _soft(sd: np.ndarray, edge: float) -> np.ndarray:
    """Inside-ness in [0, 1] from a signed distance (negative inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(sd / edge, -40, 40)))


def bullet_sd(x: np.ndarray, y: np.ndarray, apex, direction, length: float, radius: float, pad: float = 0.0):
    """Approximate signed distance (cm) to a cavity of revolution (apex to base), grown by pad."""
    dx, dy = direction
    rx, ry = x - apex[0], y - apex[1]
    along = rx * dx + ry * dy  # 0 at apex, length at base
    across = np.abs(-rx * dy + ry * dx)
    u = 1.0 - along / length  # 0 at base, 1 at apex
    side = across - (radius * lv_profile(u) + pad)
    tip = -(along + pad)  # beyond the apex
    base = along - length  # beyond the base plane (the valve plane stays flat)
    return np.maximum(np.maximum(side, tip), base)


def ellipse_sd(x, y, center, axes, angle: float = 0.0):
    """Approximate signed distance (cm) to an ellipse."""
    c, s = math.cos(angle), math.sin(angle)
    rx, ry = x - center[0], y - center[1]
    u = (rx * c + ry * s) / axes[0]
    v = (-rx * s + ry * c) / axes[1]
    return (np.sqrt(u * u + v * v) - 1.0) * min(axes)


def segment_sd(x, y, p, q, half_width: float):
    """Signed distance (cm) to a thick line segment from p to q."""
    px, py = x - p[0], y - p[1]
    vx, vy = q[0] - p[0], q[1] - p[1]
    t = np.clip((px * vx + py * vy) / max(vx * vx + vy * vy, 1e-12), 0.0, 1.0)
    return np.hypot(px - t * vx, py - t * vy) - half_width


def _paint(img: np.ndarray, sd: np.ndarray, value: float, edge: float) -> None:
    m = _soft(sd, edge)
    img *= 1.0 - m
    img += value * m


class Scanner:
    """Renders one heart's cine as seen by one vendor on one pixel grid."""

    def __init__(self, heart: Heart, vendor: Vendor, grid: PixelGrid, rng: np.random.Generator):
        self.heart, self.vendor, self.grid, self.rng = heart, vendor, grid, rng
        self.x, self.y = grid.coords()
        self.edge = 0.6 * grid.scale
        r = np.hypot(self.x, self.y)
        theta = np.arctan2(self.x, self.y)
        self.r, self.theta = r, theta
        depth, alpha = vendor.depth, vendor.half_angle
        self.sector = _soft(np.maximum(r - depth, (np.abs(theta) - alpha) * r), self.edge) * (r > 0.4)
        # Attenuation, partly compensated by time-gain control; weaker at the sector edges.
        self.field = np.exp(-0.035 * r) * np.clip(1.0 - 0.45 * (np.abs(theta) / alpha) ** 4, 0.0, 1.0)
        # Polar speckle grid: ~0.08 cm axially, ~0.9 degrees laterally.
        self.n_r, self.n_t = max(64, int(depth / 0.08)), max(48, int(2 * math.degrees(alpha) / 0.9))
        self.ir = np.clip((r / depth * self.n_r).astype(np.int64), 0, self.n_r - 1)
        self.it = np.clip(((theta + alpha) / (2 * alpha) * self.n_t).astype(np.int64), 0, self.n_t - 1)
        self.static = self._complex_field()
        l_ed, r_ed = heart.ed_axes()
        self.l_ed, self.r_ed = l_ed, r_ed

    def _complex_field(self) -> np.ndarray:
        z = self.rng.standard_normal((2, self.n_r, self.n_t)).astype(np.float32)
        k = self.vendor.speckle
        for i in range(2):
            z[i] = cv2.GaussianBlur(z[i], (0, 0), sigmaX=k, sigmaY=0.6)
        return z

    def echogenicity(self, st: HeartState, c: float, theta_beat: float) -> np.ndarray:
        """Echogenicity map (linear, before speckle) of one frame."""
        h, x, y, e = self.heart, self.x, self.y, self.edge
        img = np.full(x.shape, TISSUE, dtype=np.float64)
        img *= 0.8 + 0.4 * np.clip(y / 16.0, 0, 1)
        dx, dy = st.direction
        nx, ny = -dy, dx
        bx, by = st.base
        annulus = self.r_ed * lv_profile(np.array(0.0)).item()
        # Right ventricle: left of the septum, slightly more apical valve plane, own contraction.
        rv_len = h.rv_scale * self.l_ed * (1.0 - 0.1 * c)
        rv_rad = 0.75 * self.r_ed * h.rv_scale * (1.0 - h.rv_fac * c)
        sep = self.r_ed + st.wall + 0.75 * self.r_ed * h.rv_scale + 0.15
        rv_base = (bx + nx * sep - dx * 0.6, by + ny * sep - dy * 0.6)
        rv_dir = (math.sin(h.tilt - 0.25), math.cos(h.tilt - 0.25))
        rv_apex = (rv_base[0] - rv_dir[0] * rv_len, rv_base[1] - rv_dir[1] * rv_len)
        # Atria fill while the ventricles empty.
        la_ax = (1.9 * h.la_scale * (1 + h.la_fill * c), 2.3 * h.la_scale * (1 + h.la_fill * c))
        la_c = (bx + dx * (la_ax[1] + 0.25), by + dy * (la_ax[1] + 0.25))
        ra_ax = (1.6 * h.la_scale * (1 + 0.7 * h.la_fill * c), 2.0 * h.la_scale * (1 + 0.7 * h.la_fill * c))
        ra_c = (rv_base[0] + rv_dir[0] * (ra_ax[1] + 0.25), rv_base[1] + rv_dir[1] * (ra_ax[1] + 0.25))
        # Pericardium around everything.
        cx = (st.apex[0] + la_c[0] + ra_c[0] + rv_apex[0]) / 4
        cy = (st.apex[1] + la_c[1] + ra_c[1]) / 3
        peri_axes = (self.r_ed * 2.4 + 2.2, (la_c[1] + la_ax[1] - st.apex[1]) / 2 + 1.0)
        peri = ellipse_sd(x, y, (cx, cy), peri_axes, -h.tilt * 0.5)
        _paint(img, np.abs(peri) - 0.22, PERICARDIUM, e)
        _paint(img, peri + 0.22, 0.7 * TISSUE, e)
        for center, axes, tilt in ((la_c, la_ax, -h.tilt), (ra_c, ra_ax, -(h.tilt - 0.25))):
            sd = ellipse_sd(x, y, center, axes, tilt)
            _paint(img, sd - 0.3, 0.45 * h.myo_echo, e)
            _paint(img, sd, BLOOD, e)
        _paint(img, bullet_sd(x, y, rv_apex, rv_dir, rv_len, rv_rad, pad=0.45), 0.8 * h.myo_echo, e)
        _paint(img, bullet_sd(x, y, rv_apex, rv_dir, rv_len, rv_rad), BLOOD, e)
        _paint(img, bullet_sd(x, y, st.apex, st.direction, st.length, st.radius, pad=st.wall), h.myo_echo, e)
        _paint(img, bullet_sd(x, y, st.apex, st.direction, st.length, st.radius), BLOOD, e)
        # Mitral and tricuspid leaflets: closed across the annulus in systole, open in diastole.
        closed = theta_beat < h.systole / h.beat
        for base, ndir, adir, half in (
            ((bx, by), (nx, ny), (dx, dy), annulus * (1.0 + 0.0 * c)),
            (rv_base, (-rv_dir[1], rv_dir[0]), rv_dir, 0.8 * rv_rad),
        ):
            for side in (-1.0, 1.0):
                hinge = (base[0] + side * ndir[0] * half, base[1] + side * ndir[1] * half)
                if closed:
                    tip = (
                        base[0] + side * ndir[0] * 0.1 - adir[0] * 0.3,
                        base[1] + side * ndir[1] * 0.1 - adir[1] * 0.3,
                    )
                else:
                    tip = (
                        hinge[0] - adir[0] * 1.6 - side * ndir[0] * 0.2,
                        hinge[1] - adir[1] * 1.6 - side * ndir[1] * 0.2,
                    )
                _paint(img, segment_sd(x, y, hinge, tip, 0.07), VALVE, e)
        return img

    def frame(self, t: float) -> np.ndarray:
        """One B-mode frame at time t (seconds), float32 in [0, 1]."""
        h, v = self.heart, self.vendor
        c = float(h.contraction_at(t))
        st = h.state_at_contraction(c, t)
        theta_beat = ((t - h.t_ed) / h.beat) % 1.0
        echo = self.echogenicity(st, c, theta_beat)
        fresh = self._complex_field()
        z = 0.92 * self.static + 0.39 * fresh
        amp = np.hypot(z[0], z[1])
        amp /= amp.mean()
        speckle = amp[self.ir, self.it]
        linear = v.gain * echo * speckle * self.field
        out = np.log1p(v.dynamic_range * linear) / math.log1p(v.dynamic_range)
        out += v.noise * self.rng.standard_normal(out.shape) * (0.4 + self.r / v.depth)
        return np.clip(out * self.sector, 0.0, 1.0).astype(np.float32)
