"""Cardiac geometry of the phantom: an apical-4-chamber heart whose left ventricle beats.

All lengths are in centimetres, in a frame whose origin is the transducer (the sector apex),
x to the right of the screen and y down into the body. The left-ventricle cavity is a
"bullet" of revolution around its long axis; its volume is defined, exactly as in clinic, by
the single-plane method of discs (Simpson's rule, 20 discs) on the traced outline. The ground
truth EDV, ESV and EF are therefore computed from the very chords that the phantom writes out
as tracings, so a reader can recompute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_DISCS = 20
"""Discs in the method of discs, as in EchoNet-Dynamic's VolumeTracings (20 chords + long axis)."""


def lv_profile(u: np.ndarray) -> np.ndarray:
    """Relative cavity radius along the long axis, u = 0 at the mitral annulus, 1 at the apex.

    Widest a little above the base, narrower at the annulus, closing smoothly at the apex.
    """
    u = np.clip(u, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - u**2.4, 0.0, None)) * (0.78 + 0.22 * np.sin(np.pi * np.minimum(u / 0.6, 1.0) / 2))


_DISC_U = (np.arange(N_DISCS) + 0.5) / N_DISCS
_DISC_FACTOR = float(np.mean(lv_profile(_DISC_U) ** 2))
"""V = pi * R^2 * L * _DISC_FACTOR for a cavity of long axis L and radius scale R (method of discs)."""


def disc_volume(length: float, chord_lengths: np.ndarray) -> float:
    """Method-of-discs volume (mL, from cm) of a cavity with the given long axis and chords."""
    h = length / len(chord_lengths)
    return float(np.sum(np.pi * (np.asarray(chord_lengths) / 2.0) ** 2) * h)


def contraction(theta: np.ndarray | float, systole: float) -> np.ndarray:
    """Ventricular contraction c in [0, 1] over one beat (theta in [0, 1), 0 = end-diastole).

    c = 0 at end-diastole, c = 1 at end-systole (theta == systole); then rapid filling,
    diastasis and the atrial kick bring it back to 0 at the next end-diastole.
    """
    th = np.mod(np.asarray(theta, dtype=np.float64), 1.0)
    s = systole
    fill = min(0.22, (1.0 - s) * 0.4)
    kick = min(0.14, (1.0 - s) * 0.25)
    c = np.empty_like(th)
    sys = th < s
    c[sys] = 0.5 - 0.5 * np.cos(np.pi * th[sys] / s)
    rap = (th >= s) & (th < s + fill)
    c[rap] = 1.0 - 0.8 * (0.5 - 0.5 * np.cos(np.pi * (th[rap] - s) / fill))
    dia = (th >= s + fill) & (th < 1.0 - kick)
    span = max(1e-9, 1.0 - kick - s - fill)
    c[dia] = 0.2 - 0.05 * (th[dia] - s - fill) / span
    kk = th >= 1.0 - kick
    c[kk] = 0.15 * (0.5 + 0.5 * np.cos(np.pi * (th[kk] - (1.0 - kick)) / kick))
    return c


@dataclass(frozen=True)
class Heart:
    """One patient's heart and cine timing; every frame's geometry follows from it."""

    edv: float  # mL, end-diastolic volume (method of discs)
    ef: float  # fraction in (0, 1)
    aspect: float  # long axis / radius scale at end-diastole
    tilt: float  # radians, long axis from vertical (positive: base to the right)
    apex: tuple[float, float]  # cm, LV apex (endocardial) position
    wall: float  # cm, myocardial thickness at end-diastole
    rv_scale: float  # RV size relative to LV
    rv_fac: float  # RV fractional area change (independent of LV EF: a distractor)
    la_scale: float  # LA size factor
    la_fill: float  # LA size change over the cycle
    heart_rate: float  # beats per minute
    systole: float  # seconds, end-diastole to end-systole
    t_ed: float  # seconds, first end-diastole instant (on a frame)
    breath: tuple[float, float, float]  # respiration: amplitude cm, period s, phase
    myo_echo: float  # myocardial echogenicity

    @property
    def esv(self) -> float:
        return self.edv * (1.0 - self.ef)

    @property
    def beat(self) -> float:
        return 60.0 / self.heart_rate

    def shortening(self) -> float:
        """Long-axis shortening ratio L_es / L_ed; the rest of the volume change is radial."""
        return 1.0 - 0.22 * self.ef

    def ed_axes(self) -> tuple[float, float]:
        """Long axis L and radius scale R at end-diastole, solved from EDV exactly."""
        r = (self.edv / (math.pi * self.aspect * _DISC_FACTOR)) ** (1.0 / 3.0)
        return self.aspect * r, r

    def es_axes(self) -> tuple[float, float]:
        """Long axis and radius scale at end-systole, solved so that the disc volume is ESV."""
        l_ed, r_ed = self.ed_axes()
        s = self.shortening()
        r_es = r_ed * math.sqrt((1.0 - self.ef) / s)
        return l_ed * s, r_es

    def contraction_at(self, t: np.ndarray | float) -> np.ndarray:
        theta = (np.asarray(t, dtype=np.float64) - self.t_ed) / self.beat
        return contraction(theta, self.systole / self.beat)

    def state(self, t: float) -> HeartState:
        """Geometry at time t (seconds)."""
        c = float(self.contraction_at(t))
        return self.state_at_contraction(c, t)

    def state_at_contraction(self, c: float, t: float = 0.0) -> HeartState:
        l_ed, r_ed = self.ed_axes()
        l_es, r_es = self.es_axes()
        length = l_ed + (l_es - l_ed) * c
        radius = r_ed + (r_es - r_ed) * c
        # Myocardium thickens in systole (roughly conserving wall volume).
        wall = self.wall * (1.0 + 0.55 * self.ef * c)
        amp, period, phase = self.breath
        shift = amp * math.sin(2 * math.pi * t / period + phase)
        ax, ay = self.apex
        return HeartState(
            c=c,
            apex=(ax + 0.3 * shift, ay + shift),
            direction=(math.sin(self.tilt), math.cos(self.tilt)),
            length=length,
            radius=radius,
            wall=wall,
        )


@dataclass(frozen=True)
class HeartState:
    """LV geometry of one frame: apex, unit long-axis direction (apex to base), sizes."""

    c: float
    apex: tuple[float, float]
    direction: tuple[float, float]
    length: float
    radius: float
    wall: float

    @property
    def base(self) -> tuple[float, float]:
        return (
            self.apex[0] + self.direction[0] * self.length,
            self.apex[1] + self.direction[1] * self.length,
        )

    def chords(self) -> tuple[np.ndarray, np.ndarray]:
        """The tracing: long axis (2, 2) [apex, base] and N_DISCS chords (N, 2, 2) in cm.

        Chord i sits at the middle of disc i, perpendicular to the long axis, its half-length
        the cavity radius there: exactly the outline whose disc volume is the label.
        """
        ax, ay = self.apex
        dx, dy = self.direction
        nx, ny = -dy, dx  # unit normal
        bx, by = self.base
        u = _DISC_U  # from the base (0) to the apex (1)
        cx = bx - dx * u * self.length
        cy = by - dy * u * self.length
        half = self.radius * lv_profile(u)
        chords = np.stack(
            [np.stack([cx - nx * half, cy - ny * half], -1), np.stack([cx + nx * half, cy + ny * half], -1)],
            axis=1,
        )
        axis = np.array([[ax, ay], [bx, by]])
        return axis, chords

    def volume(self) -> float:
        """Method-of-discs volume (mL) of this frame's cavity, from its own chords."""
        axis, chords = self.chords()
        length = float(np.hypot(*(axis[1] - axis[0])))
        lengths = np.hypot(*(chords[:, 1] - chords[:, 0]).T)
        return disc_volume(length, lengths)
