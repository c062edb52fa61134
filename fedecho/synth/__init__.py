"""The synthetic echo phantom: `fedecho synth OUT --videos N --sites K --format echonet|dicom`.

No public echo data can be downloaded here, and hospitals need a safe dataset to rehearse with.
Each site gets its own scanner vendor and patient mix; every video's EDV, ESV and EF are exact
(method of discs on the generated outline). Everything is deterministic in the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedecho.storage.files import atomic_write_bytes
from fedecho.synth.dicom_writer import SECTOR, DicomArchiveWriter, Study
from fedecho.synth.echonet_writer import EchoNetWriter, echonet_name
from fedecho.synth.identity import make_patients, study_datetime
from fedecho.synth.phantom import PhantomVideo, make_video
from fedecho.synth.vendors import Vendor, make_vendors

Format = Literal["echonet", "dicom"]
MANIFEST = "phantom.json"

__all__ = ["MANIFEST", "PhantomVideo", "SiteSummary", "Vendor", "make_vendors", "make_video", "synthesize"]


@dataclass(frozen=True)
class SiteSummary:
    name: str
    directory: Path
    videos: int
    ef_mean: float
    ef_min: float
    ef_max: float


def site_sizes(total: int, n_sites: int, rng: np.random.Generator) -> list[int]:
    """Unequal site sizes (hospitals differ), at least 3 videos each so every split exists."""
    if n_sites == 1:
        return [total]
    if total < 3 * n_sites:
        raise ValueError(f"--videos {total} is too few for {n_sites} sites (need at least 3 per site)")
    w = rng.uniform(0.5, 1.5, n_sites)
    sizes = np.maximum(3, np.floor(w / w.sum() * total)).astype(int)
    while sizes.sum() > total:
        sizes[np.argmax(sizes)] -= 1
    while sizes.sum() < total:
        sizes[np.argmin(sizes)] += 1
    return [int(s) for s in sizes]


def assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """EchoNet-like 75/12.5/12.5 TRAIN/VAL/TEST, with at least one VAL and TEST when n >= 3."""
    n_val = n_test = max(1, round(0.125 * n)) if n >= 3 else 0
    splits = ["TEST"] * n_test + ["VAL"] * n_val + ["TRAIN"] * (n - n_val - n_test)
    order = rng.permutation(n)
    return [splits[i] for i in order]


def synthesize(
    out: str | Path,
    videos: int = 100,
    sites: int = 1,
    fmt: Format = "echonet",
    seed: int = 0,
    max_frames: int = 128,
    progress: bool = True,
    vary: bool = False,
) -> list[SiteSummary]:
    """Generate the phantom; with sites > 1 each site is a complete dataset in OUT/siteNN.

    vary: every video gets its own depth, sector width, gain, compression, noise and probe
    position (phantom.vary_acquisition), as real studies do; off, a site's videos share its scanner's.
    """
    out = Path(out)
    if fmt not in ("echonet", "dicom"):
        raise ValueError(f"--format must be 'echonet' or 'dicom', not {fmt!r}")
    if videos < 1 or sites < 1:
        raise ValueError("--videos and --sites must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    vendors = make_vendors(sites, seed)
    sizes = site_sizes(videos, sites, np.random.default_rng(np.random.SeedSequence([seed, 0x5173])))
    summaries: list[SiteSummary] = []
    columns = (
        TextColumn("[bold]phantom[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(fmt, total=videos)
        for k, (vendor, n) in enumerate(zip(vendors, sizes, strict=True)):
            root = out if sites == 1 else out / vendor.name
            rng = np.random.default_rng(np.random.SeedSequence([seed, k, 0x517E]))
            splits = assign_splits(n, rng)
            efs: list[float] = []
            if fmt == "echonet":
                writer = EchoNetWriter(root)
                names = _unique_names(rng, n)
                for i in range(n):
                    video = make_video(vendor, _video_rng(seed, k, i), 112, 112, max_frames, vary)
                    writer.add(names[i], video, splits[i])
                    efs.append(video.ef)
                    bar.advance(task)
            else:
                writer = DicomArchiveWriter(root, vendor, k)
                studies = _studies(n, rng, k)
                # Patient-level splits: all studies of a patient share the first study's split.
                split_of: dict[int, str] = {}
                for i, study in enumerate(studies):
                    split = split_of.setdefault(study.patient.subject_id, splits[i])
                    video = make_video(vendor, _video_rng(seed, k, i), SECTOR, SECTOR, max_frames, vary)
                    writer.add(video, study, split, rng)
                    efs.append(video.ef)
                    bar.advance(task)
            writer.close()
            summaries.append(
                SiteSummary(vendor.name, root, n, float(np.mean(efs)), float(np.min(efs)), float(np.max(efs)))
            )
    manifest = {
        "generator": "fedecho synth",
        "format": fmt,
        "seed": seed,
        "videos": videos,
        **({"acquisition": "varied per video"} if vary else {}),
        "sites": [
            {"name": s.name, "directory": str(s.directory.relative_to(out)), "videos": s.videos, "vendor": v.as_dict()}
            for s, v in zip(summaries, vendors, strict=True)
        ],
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return summaries


def _video_rng(seed: int, site: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, site, index, 0xEC40]))


def _unique_names(rng: np.random.Generator, n: int) -> list[str]:
    names: dict[str, None] = {}
    while len(names) < n:
        names[echonet_name(rng)] = None
    return list(names)


def _studies(n: int, rng: np.random.Generator, site_index: int) -> list[Study]:
    """n studies over about n/1.3 patients: some patients come back for a second echo."""
    patients = make_patients(max(1, int(np.ceil(n / 1.3))), rng, site_index)
    owners = list(range(len(patients))) + list(rng.integers(0, len(patients), n - len(patients)))
    ids = rng.choice(9_999_999, size=n, replace=False) + 90_000_000
    studies = [Study(patients[p], int(sid), study_datetime(rng)) for p, sid in zip(owners[:n], ids, strict=True)]
    return sorted(studies, key=lambda s: (s.patient.subject_id, s.when))
