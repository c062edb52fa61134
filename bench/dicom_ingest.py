"""Is registering a DICOM archive fast enough, and does it scale with cores? Files and frames per
second `fedecho data add` registers at 1 and 2 worker processes, against a bare pydicom decode of
the same files, and what that projects to for MIMIC-IV-ECHO on a 32-core server.

    python bench/dicom_ingest.py --videos 24 --max-frames 64 --workers 1,2 --repeats 1

Synthesises a phantom hospital archive into --work once (`fedecho synth --format dicom`, with
--encodings: by default every encoding the phantom writer knows, plus the still images a real
archive holds), reused by later runs. The timed files are its cines that pydicom itself decodes
(the video transfer syntaxes need fedecho's reader), hard-linked into an archive of their own, so
that both sides read the same files. Each --repeats times (median):
- bare: `pydicom.pixels.iter_pixels` over every one of those files, one process, nothing else;
- `fedecho.data.ingest.ingest(workers=N)` (what `fedecho data add --workers N` runs: the scan, then
  hashing, header checks, decode, de-identification, sector blanking, grayscale detection, the
  fsynced write and the manifest row) into a fresh site folder, for each N in --workers. Its reader
  decodes lossless JPEG and JPEG-LS with imagecodecs (the same frames, several times faster than
  pydicom's plugins, which the bare decode uses), everything else with pydicom's plugins as bare does.
The per-worker ratio is (ingest frames/s / N) / bare frames/s: the target is at least 0.8x, so
that N workers register at least 0.8 N times what one bare decoder reads. Frames per CPU second (this
process and the workers' jobs) against the bare decode's is the same comparison without what other
programs on the machine take from the wall clock. Ingest's time includes its
scan (the headers read in the N worker processes, the labels joined in one), reported on its own too.
The whole archive (every encoding, the stills) is then registered once at the largest N, for the record
and for the scan rate.

Projection for a 32-core server (--cores) and 525,328 cines of 70 frames (--cines, --cine-frames):
the scan at --cores x the per-worker scan rate measured here on the whole archive, plus decoding at
--cores x the per-worker decode rate measured here at the largest N (linear scaling assumed; that server's
cores as fast as this machine's, its disks fast enough). A loaded machine measures less: the
load average at the start is printed and stored.

Writes bench/results/dicom_ingest.json (with the `table` rows `make bench` collects).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from _table import table_row
from pydicom.pixels import iter_pixels

from fedecho.data import open_source
from fedecho.data.ingest import ingest
from fedecho.synth import synthesize

TARGET = 0.8
warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")  # the phantom's odd headers, on purpose
ITEM = "DICOM ingest"


def make_archive(archive: Path, videos: int, max_frames: int, encodings: str) -> None:
    """The phantom archive, written once (a later run with the same arguments reuses it)."""
    if (archive / "phantom.json").is_file():
        return
    shutil.rmtree(archive, ignore_errors=True)
    try:
        synthesize(archive, videos=videos, fmt="dicom", seed=0, max_frames=max_frames, progress=False,
                   encodings=encodings)  # fmt: skip
    except TypeError:  # a phantom writer without encodings: its default archive
        synthesize(archive, videos=videos, fmt="dicom", seed=0, max_frames=max_frames, progress=False)


def bare_decode(files: list[Path]) -> dict[str, Any]:
    """pydicom's own decode of every file, frame by frame (files it cannot decode are counted apart)."""
    frames = failed = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for f in files:
        try:
            for _ in iter_pixels(f):
                frames += 1
        except Exception:
            failed += 1
    return {"files": len(files) - failed, "failed": failed, "frames": frames, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0}  # fmt: skip


def timed_ingest(archive: Path, site: Path, workers: int) -> dict[str, Any]:
    """One whole `data add` pass into a new site folder."""
    shutil.rmtree(site, ignore_errors=True)
    result = ingest(archive, site, workers=workers, progress=False)
    shutil.rmtree(site)
    return {
        "files": result.files, "registered": len(result.added), "frames": result.frames,
        "quarantined": result.reasons, "seconds": result.seconds, "scan_seconds": result.scan_seconds,
        "cpu_seconds": result.cpu_seconds, "workers": result.workers,
    }  # fmt: skip


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def linked(files: list[Path], root: Path, folder: Path) -> Path:
    """An archive of just these files (hard links: no copy), their paths kept."""
    shutil.rmtree(folder, ignore_errors=True)
    for f in files:
        target = folder / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
    return folder


def decodable(files: list[Path]) -> list[Path]:
    """The cine files pydicom itself decodes (the video transfer syntaxes need fedecho's own reader)."""
    out = []
    for f in files:
        try:
            for _ in iter_pixels(f):
                pass
            out.append(f)
        except Exception:
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--max-frames", type=int, default=64)
    p.add_argument("--encodings", default="all", help="the phantom's DICOM encodings ('all', 'default' or names)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cores", type=int, default=32, help="the server the projection is for")
    p.add_argument("--cines", type=int, default=525_328, help="MIMIC-IV-ECHO's cine count")
    p.add_argument("--cine-frames", type=int, default=70, help="frames per cine, for the projection")
    p.add_argument("--work", type=Path, default=Path("bench/work/dicom"))
    p.add_argument("--out", type=Path, default=Path("bench/results/dicom_ingest.json"))
    args = p.parse_args()
    counts = sorted({int(n) for n in args.workers.split(",")})
    load = os.getloadavg()[0]
    archive = args.work / f"archive-{args.videos}-{args.max_frames}-{args.encodings.replace(',', '+')}"
    make_archive(archive, args.videos, args.max_frames, args.encodings)
    cines = [r.files[0] for r in open_source(archive, "dicom", require_labels=False).scan().records]
    files = decodable(cines)
    same = linked(files, archive, args.work / "decodable")  # ingest and the bare decode read the same files
    for f in sorted(archive.rglob("*")):  # into the page cache: every run reads from memory
        if f.is_file():
            f.read_bytes()
    warm = linked(files[:2], archive, args.work / "warm")  # imports, decoders, the fork server: untimed
    ingest(warm, args.work / "site", workers=max(counts), progress=False)
    shutil.rmtree(args.work / "site")

    bare_runs: list[dict[str, Any]] = []
    ingest_runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        bare_runs.append(bare_decode(files))
        for n in counts:
            ingest_runs[n].append(timed_ingest(same, args.work / "site", n))
    mixed = timed_ingest(archive, args.work / "site", max(counts))  # every encoding, the stills: for the record
    bare = median_run(bare_runs)
    bare_fps = bare["frames"] / bare["seconds"]
    rows: list[dict[str, Any]] = [{"run": "bare pydicom iter_pixels", "workers": 1, **bare,
                                   "files_s": bare["files"] / bare["seconds"], "frames_s": bare_fps}]  # fmt: skip
    for n in counts:
        run = median_run(ingest_runs[n])
        decode_s = run["seconds"] - run["scan_seconds"]
        rows.append({
            "run": f"fedecho data add --workers {n}", **run,
            "files_s": run["files"] / run["seconds"], "frames_s": run["frames"] / run["seconds"],
            "per_worker_ratio": run["frames"] / run["seconds"] / run["workers"] / bare_fps,
            "cpu_ratio": run["frames"] / run["cpu_seconds"] / (bare["frames"] / bare["cpu_seconds"]),
            "decode_frames_s_per_worker": run["frames"] / decode_s / run["workers"],
        })  # fmt: skip
    rows.append({
        "run": f"fedecho data add --workers {mixed['workers']}, whole archive", **mixed,
        "files_s": mixed["files"] / mixed["seconds"], "frames_s": mixed["frames"] / mixed["seconds"],
    })  # fmt: skip
    one, top = rows[1], rows[len(counts)]
    scaling = top["frames_s"] / one["frames_s"]
    scan_files_s = mixed["files"] / mixed["scan_seconds"]
    per_core = top["decode_frames_s_per_worker"]
    scan_per_core = scan_files_s / mixed["workers"]
    scan_h = args.cines / (scan_per_core * args.cores) / 3600
    decode_h = args.cines * args.cine_frames / (per_core * args.cores) / 3600
    per_cpu_s = top["frames"] / top["cpu_seconds"]  # what a core gives when nothing else runs on it
    decode_cpu_h = args.cines * args.cine_frames / (per_cpu_s * args.cores) / 3600
    projection = {
        "cines": args.cines, "frames_per_cine": args.cine_frames, "cores": args.cores,
        "per_core_frames_s": per_core, "measured_at_workers": top["workers"], "scan_files_s": scan_files_s,
        "scan_files_s_per_core": scan_per_core,
        "scan_hours": scan_h, "decode_hours": decode_h, "hours": scan_h + decode_h,
        "frames_per_cpu_s": per_cpu_s, "decode_hours_by_cpu": decode_cpu_h,
    }  # fmt: skip
    table = [
        table_row(ITEM, f"fedecho data add frames/s per worker / bare pydicom decode frames/s ({r['workers']} "
                  f"worker{'s' if r['workers'] > 1 else ''})", round(r["per_worker_ratio"], 2), "x",
                  f">= {TARGET}x", r["per_worker_ratio"] >= TARGET)
        for r in rows[1 : len(counts) + 1]
    ] + [
        table_row(ITEM, f"fedecho data add frames per CPU second / bare pydicom decode's ({top['workers']} "
                  f"worker{'s' if top['workers'] > 1 else ''})", round(top["cpu_ratio"], 2), "x",
                  f">= {TARGET}x", top["cpu_ratio"] >= TARGET),
        table_row(ITEM, f"projected MIMIC-IV-ECHO registration ({args.cines:,} cines x {args.cine_frames} frames, "
                  f"{args.cores} cores)", round(scan_h + decode_h, 1), "h"),
    ]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"videos": args.videos, "max_frames": args.max_frames, "encodings": args.encodings,
               "repeats": args.repeats, "cine_files": len(cines), "pydicom_decodable": len(files),
               "cpus": os.cpu_count(), "load_average_at_start": load}  # fmt: skip
    result = {**summary, "rows": rows, "projection": projection, "table": table}
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{archive}: {len(cines)} cines, {len(files)} of which pydicom decodes (timed below), "
          f"median of {args.repeats}; {os.cpu_count()} CPUs, load average {load:.1f} at the start\n")  # fmt: skip
    print("| run | files | frames | s | files/s | frames/s | per worker / bare | CPU s | frames per CPU s / bare |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['per_worker_ratio']:.2f}x" if "per_worker_ratio" in r else ""
        cpu = f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else ""
        print(f"| {r['run']} | {r['files']} | {r['frames']} | {r['seconds']:.1f} | {r['files_s']:.2f} "
              f"| {r['frames_s']:.0f} | {ratio} | {r['cpu_seconds']:.1f} | {cpu} |")  # fmt: skip
    print(f"\nwhole archive quarantined: {mixed['quarantined']}")
    print(f"scan ({mixed['workers']} workers): {mixed['scan_seconds']:.1f} s, {scan_files_s:.1f} files/s")
    if top is not one:
        print(f"{top['workers']} workers / {one['workers']}: {scaling:.2f}x frames/s "
              f"({scaling * one['workers'] / top['workers']:.2f} of linear)")  # fmt: skip
    print(f"Target: each worker at least {TARGET}x a bare decode's frames/s, near-linear in workers.")
    print(f"\nProjection, {args.cines:,} cines x {args.cine_frames} frames on {args.cores} cores: "
          f"{scan_h + decode_h:.1f} h = scan {scan_h:.1f} h ({args.cores} x {scan_per_core:.0f} files/s per worker) "
          f"+ decode {decode_h:.1f} h ({args.cores} x {per_core:.0f} frames/s, the per-worker rate measured "
          f"here at {top['workers']} worker{'s' if top['workers'] > 1 else ''}, linear scaling assumed)")  # fmt: skip
    print(f"By CPU time instead (each of the {args.cores} cores busy with registration only, {per_cpu_s:.0f} frames "
          f"per CPU second as measured here): decode {decode_cpu_h:.1f} h, {scan_h + decode_cpu_h:.1f} h "
          "with the scan")  # fmt: skip


if __name__ == "__main__":
    main()
