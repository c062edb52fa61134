"""`fedecho data`: look at what a folder of echo data holds, through the data layer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedecho.data import (
    ClipSampler,
    EchoVideoDataset,
    FrameCache,
    SourceError,
    detect_source,
    open_source,
)
from fedecho.synth import MANIFEST

app = typer.Typer(
    help="Inspect echo data sources (EchoNet-Dynamic, CAMUS, TMED-2, DICOM archives).", no_args_is_help=True
)


def _roots(path: Path, kind: str) -> list[Path]:
    """The folder itself if it is a source, else its site sub-folders (a multi-site phantom)."""
    manifest = path / MANIFEST
    if manifest.is_file():
        sites = json.loads(manifest.read_text()).get("sites", [])
        return [path / s["directory"] for s in sites]
    if kind != "auto" or detect_source(path):
        return [path]
    subs = [p for p in sorted(path.iterdir()) if p.is_dir() and detect_source(p)]
    if not subs:
        raise SourceError(f"{path}: neither an echo source nor a folder of sources")
    return subs


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return f"{a.mean():.1f}±{a.std():.1f}"


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="A source folder, or a folder of site folders."
    ),
    source: str = typer.Option("auto", "--source", help="auto, echonet, camus, tmed2 or dicom."),
    labels: Path | None = typer.Option(
        None, "--labels", help="Labels CSV for a DICOM archive (path or sop_instance_uid column)."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Decoded-frame cache folder (default ~/.cache/fedecho/frames)."
    ),
    size: int = typer.Option(112, "--size", min=16, help="Frame size the cache stores (pixels, square)."),
    length: int = typer.Option(16, "--length", min=1, help="Frames per clip."),
    period: int | None = typer.Option(
        None, "--period", min=1, help="Take every PERIOD-th frame (EchoNet); default: spread evenly."
    ),
    problems: int = typer.Option(10, "--problems", min=0, help="How many skipped files to list."),
) -> None:
    """Scan, decode (once, into the cache) and summarise a data source; list skipped files.

    Example: fedecho data inspect data/phantom --cache data/cache
    """
    console = Console()
    frame_cache = FrameCache(cache)
    sampler = ClipSampler(length, period)
    options = {"labels": labels} if labels else {}
    try:
        roots = _roots(path, source)
    except SourceError as e:
        raise typer.BadParameter(str(e), param_hint="PATH") from e
    for root in roots:
        try:
            src = open_source(root, source, **options)
            ds = EchoVideoDataset(src, split=None, targets=(), sampler=sampler, size=size, cache=frame_cache)
        except SourceError as e:
            console.print(f"[red]error:[/] {e}")
            raise typer.Exit(2) from e
        ds.prepare(progress=True)
        table = Table(title=f"{root} ({src.kind})")
        by_split: dict[str, list[int]] = {}
        for i, r in enumerate(ds.records):
            by_split.setdefault(r.split or "-", []).append(i)
        present = {t for r in ds.records for t in r.targets}
        columns = ["split", "videos", "frames", "fps", "clips"]
        columns += [
            name
            for t, name in (("ef", "EF %"), ("esv", "ESV mL"), ("edv", "EDV mL"), ("as_class", "AS grades"))
            if t in present
        ]
        for col in columns:
            table.add_column(col, justify="right")
        order = {"train": 0, "val": 1, "test": 2}
        for split in sorted(by_split, key=lambda s: order.get(s, 9)):
            idx = by_split[split]
            recs = [ds.records[i] for i in idx]
            n_frames = [len(ds.frames(i)) for i in idx]
            fps = [r.fps for r in recs if r.fps]
            row = [
                split,
                str(len(idx)),
                f"{np.mean(n_frames):.0f} ({min(n_frames)}-{max(n_frames)})",
                f"{np.mean(fps):.0f}" if fps else "-",
                f"{np.mean([sampler.n_clips(n) for n in n_frames]):.1f}",
            ]
            for t in ("ef", "esv", "edv"):
                if t in present:
                    row.append(_fmt([r.targets[t] for r in recs if t in r.targets]))
            if "as_class" in present:
                grades = Counter(int(r.targets["as_class"]) for r in recs if "as_class" in r.targets)
                row.append(" ".join(f"{k}:{v}" for k, v in sorted(grades.items())))
            table.add_row(*row)
        console.print(table)
        if ds.records:
            clip, _ = ds[0]
            console.print(f"  clip tensor {tuple(clip.shape)} (channels, frames, height, width), values in [0, 1]")
        reasons = Counter(p.reason.value for p in ds.problems)
        if reasons:
            console.print("  skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
            for p in ds.problems[:problems]:
                console.print(f"    [yellow]{p.path}[/]: {p.reason.value} ({p.detail})")
        else:
            console.print("  skipped: none")
