"""Is registering a DICOM archive fast enough? Frames per second `fedecho data add` ingests against a
bare pydicom decode of the same files.

    python bench/dicom_ingest.py --videos 12 --max-frames 64 --repeats 3

Synthesises a phantom hospital archive into --work (once: `fedecho synth --format dicom`, multi-frame
JPEG-baseline YBR ultrasound cines plus the still images a real archive holds), then times, alternately,
`fedecho.data.ingest.ingest` (what `fedecho data add` runs: hash, header checks, decode, de-identify,
sector blanking, grayscale detection, the fsynced write and the manifest row) into a fresh site folder,
and `pydicom.dcmread(f).pixel_array` over the cine files ingest registers (the stills it quarantines
are not decoded by either). Median of --repeats each. Writes bench/results/dicom_ingest.json (with the
`table` rows `make bench` collects). Issue 6's target: ingest at least 0.8x the bare decode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import cv2
import pydicom
from _table import table_row

from fedecho.data.ingest import ingest
from fedecho.synth import synthesize

TARGET = 0.8


def cine_files(archive: Path) -> list[Path]:
    """The archive's multi-frame files: the ones ingest decodes and registers."""
    files = sorted(archive.rglob("*.dcm"))
    return [f for f in files if int(pydicom.dcmread(f, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) > 1]


def bare_decode(files: list[Path]) -> tuple[int, float]:
    """(frames, seconds) for pydicom's own decode of every file, nothing else."""
    t0 = time.perf_counter()
    frames = sum(pydicom.dcmread(f).pixel_array.shape[0] for f in files)
    return frames, time.perf_counter() - t0


def timed_ingest(archive: Path, site: Path) -> tuple[int, float]:
    """(frames, seconds) for a whole `data add` pass into a new site folder."""
    shutil.rmtree(site, ignore_errors=True)
    t0 = time.perf_counter()
    result = ingest(archive, site, progress=False)
    seconds = time.perf_counter() - t0
    shutil.rmtree(site)
    return result.frames, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--max-frames", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="OpenCV threads (pydicom's decoders use one)")
    p.add_argument("--work", type=Path, default=Path("bench/work/dicom"))
    p.add_argument("--out", type=Path, default=Path("bench/results/dicom_ingest.json"))
    args = p.parse_args()
    cv2.setNumThreads(args.threads)
    archive = args.work / f"archive-{args.videos}-{args.max_frames}"
    if not (archive / "phantom.json").is_file() and not any(archive.rglob("*.dcm")):
        synthesize(archive, videos=args.videos, fmt="dicom", seed=0, max_frames=args.max_frames, progress=False)
    files = cine_files(archive)
    bare_fps: list[float] = []
    ingest_fps: list[float] = []
    frames = 0
    for _ in range(args.repeats):
        frames, seconds = bare_decode(files)
        bare_fps.append(frames / seconds)
        ingested, seconds = timed_ingest(archive, args.work / "site")
        if ingested != frames:
            raise SystemExit(f"ingest registered {ingested} frames, the bare decode read {frames}")
        ingest_fps.append(ingested / seconds)
    bare, ingested_fps = statistics.median(bare_fps), statistics.median(ingest_fps)
    ratio = ingested_fps / bare
    row: dict[str, Any] = {
        "cine_files": len(files), "frames": frames, "bare_frames_s": bare, "ingest_frames_s": ingested_fps,
        "ratio": ratio,
    }  # fmt: skip
    table = [
        table_row("4. DICOM ingest", "fedecho data add frames/s / bare pydicom decode frames/s", round(ratio, 2),
                  "x", f">= {TARGET}x", ratio >= TARGET)
    ]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"videos": args.videos, "max_frames": args.max_frames, "repeats": args.repeats}
    args.out.write_text(json.dumps({**summary, "rows": [row], "table": table}, indent=2) + "\n")
    print(f"\n{len(files)} cine files, {frames} frames, median of {args.repeats}\n")
    print("| bare pydicom frames/s | fedecho data add frames/s | ratio |")
    print("|---|---|---|")
    print(f"| {bare:.0f} | {ingested_fps:.0f} | {ratio:.2f}x |")
    print(f"\nTarget (issue 6): ingest at least {TARGET}x the bare decode.")


if __name__ == "__main__":
    main()
