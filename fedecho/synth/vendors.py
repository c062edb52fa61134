"""Scanner "vendors": each phantom site images hearts differently, like real hospitals do.

Gain, electronic noise, sector depth and width, frame rate, compression and the site's patient
mix (its EF distribution) all differ between vendors, so partitions are realistically non-IID.
Each vendor also has an encoding profile: how its DICOM cines are stored (spread_encodings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

_MAKERS = [
    ("Acuson Medical", "Sequoia 512"),
    ("Philips Ultrasound", "EPIQ 7C"),
    ("GE Vingmed Ultrasound", "Vivid E95"),
    ("Canon Medical Systems", "Aplio i900"),
    ("Samsung Medison", "HERA W10"),
    ("Esaote", "MyLab X8"),
    ("Mindray", "Resona 7"),
    ("Hitachi Aloka", "Lisendo 880"),
]
_FRAME_RATES = [50.0, 30.0, 60.0, 44.0, 73.0, 40.0, 55.0, 35.0]


@dataclass(frozen=True)
class Vendor:
    """How one site's scanner renders a heart, and which patients the site sees."""

    name: str
    manufacturer: str
    model: str
    gain: float  # linear pre-compression gain
    noise: float  # additive electronic noise (std, after log compression)
    depth: float  # cm, imaging depth
    half_angle: float  # radians, half the sector opening
    fps: float  # frames per second
    dynamic_range: float  # log-compression factor
    speckle: float  # lateral speckle correlation, in polar grid cells
    ef_mean: float  # this site's patient mix
    ef_sd: float
    heart_rate: float  # mean heart rate, bpm
    # How this scanner (and its PACS) stores cines: names from fedecho.synth.encodings.ENCODINGS,
    # used in turn, cine by cine.
    encodings: tuple[str, ...] = ("jpeg_ybr422",)
    # Where its headers name a cine's view (fedecho.data.views): "code" (View Code Sequence), "name"
    # (View Name), "series" (Series Description only) or "none".
    view_naming: str = "code"

    def sample_ef(self, rng: np.random.Generator) -> float:
        return float(np.clip(rng.normal(self.ef_mean, self.ef_sd), 0.18, 0.82))

    def as_dict(self) -> dict[str, float | str | list[str]]:
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in self.__dataclass_fields__}


VIEW_NAMINGS = ("code", "name", "series", "none")

REFERENCE = Vendor(
    name="reference",
    manufacturer="fedecho phantom",
    model="A4C-1",
    gain=1.0,
    noise=0.03,
    depth=16.0,
    half_angle=math.radians(37.0),
    fps=50.0,
    dynamic_range=100.0,
    speckle=1.0,
    ef_mean=0.52,
    ef_sd=0.14,
    heart_rate=75.0,
    encodings=("jpeg_ybr422",),
)


def make_vendors(n_sites: int, seed: int) -> list[Vendor]:
    """One vendor per site; a single site gets the reference scanner with the widest EF mix."""
    if n_sites == 1:
        return [REFERENCE]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E4D0]))
    # Site patient mixes spread from heart-failure clinics to screening populations.
    means = np.linspace(0.36, 0.64, n_sites)
    rng.shuffle(means)
    vendors = []
    for k in range(n_sites):
        maker, model = _MAKERS[k % len(_MAKERS)]
        vendors.append(
            Vendor(
                name=f"site{k + 1:02d}",
                manufacturer=maker,
                model=model,
                gain=float(rng.uniform(0.7, 1.4)),
                noise=float(rng.uniform(0.01, 0.07)),
                depth=float(rng.uniform(14.5, 18.5)),
                half_angle=math.radians(float(rng.uniform(31.0, 43.0))),
                fps=_FRAME_RATES[k % len(_FRAME_RATES)],
                dynamic_range=float(rng.choice([40.0, 80.0, 150.0])),
                speckle=float(rng.uniform(0.6, 1.6)),
                ef_mean=float(means[k]),
                ef_sd=float(rng.uniform(0.08, 0.13)),
                heart_rate=float(rng.uniform(64.0, 86.0)),
                encodings=("jpeg_ybr422",) if k % 3 != 2 else ("explicit_mono2",),
                view_naming=VIEW_NAMINGS[k % len(VIEW_NAMINGS)],
            )
        )
    return vendors


def spread_encodings(vendors: list[Vendor], sizes: list[int], names: tuple[str, ...]) -> list[Vendor]:
    """Give each vendor a consecutive slice of `names` as long as its number of cines, so that an
    archive with at least len(names) cines stores every encoding at least once."""
    out, start = [], 0
    for vendor, n in zip(vendors, sizes, strict=True):
        share = tuple(names[(start + i) % len(names)] for i in range(max(1, min(n, len(names)))))
        out.append(replace(vendor, encodings=share))
        start += n
    return out
