"""The synthetic echo phantom: `fedecho synth OUT --videos N --sites K --format echonet|dicom`.

No public echo data can be downloaded here, and hospitals need a safe dataset to rehearse with.
Each site gets its own scanner vendor and patient mix; every video's EDV, ESV and EF are exact
(method of discs on the generated outline). Everything is deterministic in the seed.

DICOM archives: `--encodings all` spreads every encoding of fedecho.synth.encodings over the
sites' vendors and cines; the text burned into each file's pixels is listed in OUT/overlays.json,
beside phantom.json (outside the site folders; with one site OUT is the archive, and readers skip
.json files), for leak tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedecho.storage.files import atomic_write_bytes
from fedecho.synth.dicom_writer import FULL, DicomArchiveWriter, Geometry, Study
from fedecho.synth.echonet_writer import EchoNetWriter, echonet_name
from fedecho.synth.encodings import ENCODINGS, resolve
from fedecho.synth.identity import make_patients, study_datetime
from fedecho.synth.phantom import PhantomVideo, make_video
from fedecho.synth.vendors import Vendor, make_vendors, spread_encodings

Format = Literal["echonet", "dicom"]
MANIFEST = "phantom.json"
OVERLAYS = "overlays.json"  # burned-in text per DICOM file: test ground truth, never part of an archive

__all__ = [
    "ENCODINGS",
    "MANIFEST",
    "OVERLAYS",
    "PhantomVideo",
    "SiteSummary",
    "Vendor",
    "make_vendors",
    "make_video",
    "synthesize",
]


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
    encodings: str = "default",
    geometry: Geometry = FULL,
    references: dict[str, np.ndarray] | None = None,
    other_views: int = 0,
) -> list[SiteSummary]:
    """Generate the phantom; with sites > 1 each site is a complete dataset in OUT/siteNN.

    vary: every video gets its own depth, sector width, gain, compression, noise and probe
    position (phantom.vary_acquisition), as real studies do; off, a site's videos share its scanner's.
    encodings (DICOM): 'default' (JPEG baseline, or raw pixels for every third vendor), 'all' or
    comma-separated names from ENCODINGS, spread over the vendors so that every one is used once
    there are at least as many cines. geometry: the scanner screen (dicom_writer.FULL; TINY for
    tests). references: filled with each DICOM cine's reference frames by path under OUT (tests).
    other_views (DICOM): cines of other views (PLAX, A2C, PSAX) per study besides the labelled A4C
    one, their view named in the header as each site's scanner does (Vendor.view_naming); the
    study's EF is also written per study (study-labels.csv), as echo reports keep it.
    """
    out = Path(out)
    if fmt not in ("echonet", "dicom"):
        raise ValueError(f"--format must be 'echonet' or 'dicom', not {fmt!r}")
    if videos < 1 or sites < 1:
        raise ValueError("--videos and --sites must be at least 1")
    names = resolve(encodings)
    if fmt != "dicom" and encodings != "default":
        raise ValueError("--encodings applies to --format dicom only")
    if other_views and fmt != "dicom":
        raise ValueError("--other-views applies to --format dicom only")
    if other_views < 0:
        raise ValueError("--other-views must be 0 or more")
    out.mkdir(parents=True, exist_ok=True)
    vendors = make_vendors(sites, seed)
    sizes = site_sizes(videos, sites, np.random.default_rng(np.random.SeedSequence([seed, 0x5173])))
    if fmt == "dicom" and encodings != "default":
        vendors = spread_encodings(vendors, sizes, names)
    overlays: dict[str, dict[str, object]] = {}
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
                prefix = "" if sites == 1 else f"{vendor.name}/"
                site_refs: dict[str, np.ndarray] | None = {} if references is not None else None
                # Text inside the declared region comes with the mixed archive: the default one keeps
                # the region clean, as the existing crop-to-region readers expect.
                writer = DicomArchiveWriter(root, vendor, k, geometry, site_refs, region_text=encodings != "default")
                studies = _studies(n, rng, k)
                # Patient-level splits: all studies of a patient share the first study's split.
                split_of: dict[int, str] = {}
                for i, study in enumerate(studies):
                    split = split_of.setdefault(study.patient.subject_id, splits[i])
                    enc = writer.encoding(i)
                    # Video syntaxes fix or cap the frame rate: such a cine is acquired at a rate they allow.
                    scanner = vendor
                    if enc.stream_rate(vendor.fps) != vendor.fps:
                        scanner = dataclasses.replace(vendor, fps=enc.stream_rate(vendor.fps))
                    video = make_video(
                        scanner, _video_rng(seed, k, i), geometry.sector, geometry.sector, max_frames, vary
                    )
                    writer.add(video, study, split, rng, enc.name, other_views)
                    efs.append(video.ef)
                    bar.advance(task)
            writer.close()
            if fmt == "dicom":
                overlays.update({prefix + rel: entry for rel, entry in writer.files.items()})
                if references is not None and site_refs is not None:
                    references.update({prefix + rel: ref for rel, ref in site_refs.items()})
            summaries.append(
                SiteSummary(vendor.name, root, n, float(np.mean(efs)), float(np.min(efs)), float(np.max(efs)))
            )
    used = sorted({str(e["encoding"]) for e in overlays.values() if e["kind"] == "cine"})
    manifest = {
        "generator": "fedecho synth",
        "format": fmt,
        "seed": seed,
        "videos": videos,
        **({"acquisition": "varied per video"} if vary else {}),
        **({"encodings": {name: ENCODINGS[name].as_dict() for name in used}} if fmt == "dicom" else {}),
        "sites": [
            {"name": s.name, "directory": str(s.directory.relative_to(out)), "videos": s.videos, "vendor": v.as_dict()}
            for s, v in zip(summaries, vendors, strict=True)
        ],
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    if fmt == "dicom":
        sidecar = {
            "generator": "fedecho synth",
            "about": "text burned into each DICOM file's pixels (fake identities): ground truth for leak tests",
            "encodings": used,
            "files": overlays,
        }
        atomic_write_bytes(out / OVERLAYS, json.dumps(sidecar).encode())
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
