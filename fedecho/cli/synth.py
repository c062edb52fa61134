"""`fedecho synth`: generate the synthetic echo phantom."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def synth(
    out: Path = typer.Argument(..., help="Output folder (created)."),
    videos: int = typer.Option(100, "--videos", "-n", min=1, help="Total number of videos over all sites."),
    sites: int = typer.Option(
        1, "--sites", "-k", min=1, help="Sites, each with its own scanner vendor and patient mix."
    ),
    fmt: str = typer.Option(
        "echonet", "--format", "-f", help="echonet (FileList/VolumeTracings/AVI) or dicom (hospital archive)."
    ),
    seed: int = typer.Option(0, "--seed", "-s", help="Everything is deterministic in the seed."),
    max_frames: int = typer.Option(128, "--max-frames", min=8, help="Longest cine, in frames."),
    encodings: str = typer.Option(
        "default",
        "--encodings",
        help="dicom only: default (JPEG baseline, raw pixels for every third vendor), all (every transfer "
        "syntax, pixel layout and header form the phantom can write, spread over sites and cines) or "
        "comma-separated names from fedecho.synth.encodings.",
    ),
    other_views: int = typer.Option(
        0,
        "--other-views",
        min=0,
        help="dicom only: cines of other views (PLAX, A2C, PSAX) per study besides the labelled A4C one, "
        "each site's scanner naming the view its own way; study-labels.csv holds EF per study.",
    ),
) -> None:
    """Generate apical-4-chamber phantom cines with exact EDV/ESV/EF labels.

    Example: fedecho synth data/phantom --videos 300 --sites 5 --format echonet --seed 0
    """
    from fedecho.synth import synthesize
    from fedecho.synth.encodings import resolve

    try:
        names = resolve(encodings)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--encodings") from e
    if fmt not in ("echonet", "dicom"):
        raise typer.BadParameter("must be 'echonet' or 'dicom'", param_hint="--format")
    try:
        summaries = synthesize(
            out,
            videos=videos,
            sites=sites,
            fmt=fmt,  # type: ignore[arg-type]
            seed=seed,
            max_frames=max_frames,
            encodings=encodings,
            other_views=other_views,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    table = Table(title=f"phantom ({fmt}) in {out}")
    for col in ("site", "folder", "videos", "EF mean %", "EF range %"):
        table.add_column(col, justify="right" if col not in ("site", "folder") else "left")
    for s in summaries:
        table.add_row(s.name, str(s.directory), str(s.videos), f"{s.ef_mean:.1f}", f"{s.ef_min:.1f}-{s.ef_max:.1f}")
    console = Console()
    console.print(table)
    if fmt == "dicom" and encodings != "default" and videos < len(names):
        console.print(f"[yellow]{videos} cines hold {videos} of the {len(names)} encodings asked for[/]")
