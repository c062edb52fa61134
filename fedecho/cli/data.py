"""`fedecho data`: look at what a folder of echo data holds; register a site's data, de-identified."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedecho.data import StudyCounts

app = typer.Typer(
    help="Inspect echo data sources (EchoNet-Dynamic, CAMUS, TMED-2, DICOM archives, registered site folders) "
    "and register a site's data, de-identified.",
    no_args_is_help=True,
)


def _roots(path: Path, kind: str) -> list[Path]:
    """The folder itself if it is a source, else its site sub-folders (a multi-site phantom)."""
    from fedecho.data import SourceError, detect_source
    from fedecho.synth import MANIFEST

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
    import numpy as np

    if not values:
        return "-"
    a = np.asarray(values)
    return f"{a.mean():.1f}±{a.std():.1f}"


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="A source folder, or a folder of site folders."
    ),
    source: str = typer.Option("auto", "--source", help="auto, echonet, camus, tmed2, dicom or site."),
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
    import numpy as np

    from fedecho.data import ClipSampler, EchoVideoDataset, FrameCache, SourceError, open_source

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


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _quarantine_table(title: str, rows: list[tuple[int, str, str, str | None]], show_paths: bool) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("reason")
    table.add_column("detail")
    if show_paths:
        table.add_column("file (in SOURCE)")
    for row_id, reason, detail, path in rows:
        table.add_row(str(row_id), reason, detail, *([path or "?"] if show_paths else []))
    return table


@app.command("add")
def add(
    source: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="A DICOM archive, or an EchoNet-Dynamic, CAMUS or TMED-2 folder."
    ),
    site_dir: Path = typer.Option(..., "--site-dir", help="The site folder (created): site.db, videos/, site.salt."),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="Labels CSV for a DICOM archive (EF, ESV, EDV, AS), per file (path or sop_instance_uid column) or "
        "per study (study_instance_uid, or MIMIC-IV-ECHO's study_id): a study's label goes to its cines of --views.",
    ),
    views: str | None = typer.Option(
        None,
        "--views",
        help="Study labels: the views (comma-separated: A4C, A2C, A3C, A5C, PLAX, PSAX, SUBCOSTAL, SUPRASTERNAL) "
        "whose cines take their study's label, read from View Code Sequence or View Name [default: A4C].",
    ),
    series_pattern: str | None = typer.Option(
        None,
        "--series-pattern",
        help="Study labels: a regular expression a Series Description matches when it names an accepted view "
        "(for scanners that name views only there), e.g. '(?i)\\b(a4c|4ch)\\b'.",
    ),
    accept_unnamed_views: bool = typer.Option(
        False,
        "--accept-unnamed-views",
        help="Study labels: also label cines whose header names no view (an archive known to hold one view).",
    ),
    kind: str = typer.Option("auto", "--source", help="auto, echonet, camus, tmed2 or dicom."),
    show_paths: bool = typer.Option(
        False,
        "--show-paths",
        help="Name quarantined files by their path in SOURCE (archive paths may embed patient ids: local eyes only).",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Decoding processes (default: one per core this process may use). Same result as one; "
        "an interrupted pass resumes where it stopped when run again.",
    ),
) -> None:
    """Register SOURCE's videos into the site folder, de-identified; quarantine bad files with reasons.

    Example: fedecho data add /archive/echo --site-dir /data/fedecho-site --labels site-labels.csv --workers 16
    """
    from fedecho.data import SourceError
    from fedecho.data.ingest import WorkerError, ingest
    from fedecho.privacy.deid import PrivacyError

    console = Console()
    if labels is not None and not labels.is_file():
        raise _fail(console, f"{labels}: no such labels file")
    given = {"views": views, "series_pattern": series_pattern, "accept_unnamed_views": accept_unnamed_views}
    view_filter = {k: v for k, v in given.items() if v}  # only what was set: checked against the source kind
    try:
        result = ingest(
            source,
            site_dir,
            kind=kind,
            labels=labels,
            views=view_filter,
            workers=workers,
            progress=True,
            console=console,
        )
    except (SourceError, PrivacyError, WorkerError) as e:
        raise _fail(console, str(e)) from e
    table = Table(title=f"registered into {site_dir} ({result.source_kind})")
    columns = ("registered", "frames", "already registered", "duplicates", "quarantined", "sector from image")
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(
        str(len(result.added)),
        str(result.frames),
        str(result.already),
        str(result.duplicates),
        str(len(result.quarantined)),
        str(result.estimated_sectors),
    )
    console.print(table)
    rate = result.files / result.seconds if result.seconds > 0 else 0.0
    console.print(
        f"  {result.files} files in {result.seconds:.1f} s ({rate:.1f} files/s, "
        f"{result.workers} worker{'s' if result.workers != 1 else ''})"
    )
    if result.estimated_sectors:
        console.print(
            f"  sector from image: {result.estimated_sectors} cines declared no trusted tissue region; "
            "their sector is the area that moves"
        )
    if result.studies is not None:
        _print_study_labels(console, result.studies, views or "A4C")
    if result.quarantined:
        console.print("  quarantined: " + ", ".join(f"{k} {v}" for k, v in result.reasons.items()))
        rows = [(q.row_id, q.reason.value, q.detail, q.path) for q in result.quarantined]
        console.print(_quarantine_table("quarantined in this pass", rows, show_paths), highlight=False)


def _print_study_labels(console: Console, c: StudyCounts, views: str) -> None:
    """How the study rows of the labels CSV reached cines: a labelled study left without a cine is said."""
    where = ", ".join(f"{n} from {k}" for k, n in sorted(c.view_sources.items()))
    console.print(
        f"  study labels: {c.studies} studies in the labels CSV, {c.labelled_cines} cines labelled"
        + (f" ({where})" if where else "")
    )
    if c.no_accepted_cine:
        console.print(
            f"  [yellow]{c.no_accepted_cine} labelled studies had no cine the view filter ({views}) accepted[/]"
            + (f", {c.no_cine} of them no readable cine at all" if c.no_cine else "")
        )
    if c.other_view or c.unnamed:
        console.print(
            f"  cines of labelled studies left unlabelled: {c.other_view} of another view, "
            f"{c.unnamed} whose header names no view (--series-pattern or --accept-unnamed-views to label them)"
        )


def _resolve_paths(source: Path, salt: bytes) -> dict[str, str]:
    """Salted path hash -> path relative to SOURCE, for every file under it (names stay at the site)."""
    from fedecho.privacy.deid import pseudonym

    out: dict[str, str] = {}
    for dirpath, dirnames, names in os.walk(source):
        dirnames.sort()
        for name in names:
            rel = (Path(dirpath) / name).relative_to(source).as_posix()
            out[pseudonym(salt, "path", rel)] = rel
    return out


@app.command("report")
def report(
    site_dir: Path = typer.Option(..., "--site-dir", help="The site folder given to `fedecho data add`."),
    source: Path | None = typer.Option(
        None, "--source", exists=True, file_okay=False, help="The original SOURCE: name quarantined files by path."
    ),
    limit: int = typer.Option(50, "--problems", min=0, help="How many quarantined files to list."),
) -> None:
    """Summarise a site folder's registered data, and list the quarantined files with their reasons.

    Example: fedecho data report --site-dir /data/fedecho-site --source /archive/echo
    """
    from fedecho.storage.site_store import SiteStore, SiteStoreMissing

    console = Console()
    try:
        store = SiteStore(site_dir, create=False)
    except SiteStoreMissing as e:
        raise _fail(console, str(e)) from e
    with store:
        summary = store.summary()
        quarantined = store.files("quarantined")
        ok = store.files("ok")
    table = Table(title=f"{site_dir}: registered data")
    for col in ("files ok", "quarantined", "duplicates", "frames", "patients", "splits", "sources"):
        table.add_column(col, justify="right")
    table.add_row(
        str(summary["ok"]),
        str(summary["quarantined"]),
        str(summary["reasons"].get("duplicate", 0)),
        str(summary["frames"]),
        str(summary["patients"]),
        " ".join(f"{k}:{v}" for k, v in summary["splits"].items()) or "-",
        " ".join(f"{k}:{v}" for k, v in summary["sources"].items()) or "-",
    )
    console.print(table)
    present = sorted({t for r in ok for t in r.targets})
    if present:
        console.print("  targets: " + ", ".join(f"{t} {sum(t in r.targets for r in ok)}" for t in present))
    if summary["reasons"]:
        console.print("  quarantined: " + ", ".join(f"{k} {v}" for k, v in summary["reasons"].items()))
    else:
        console.print("  quarantined: none")
    if quarantined and limit:
        paths: dict[str, str] = {}
        if source is not None:
            from fedecho.privacy.deid import SALT_FILE, PrivacyError, load_or_create_salt

            if not (site_dir / SALT_FILE).is_file():
                raise _fail(console, f"{site_dir}: no {SALT_FILE}; cannot name files")
            try:
                paths = _resolve_paths(source, load_or_create_salt(site_dir))
            except PrivacyError as e:
                raise _fail(console, str(e)) from e
        rows = [(q.id, q.reason, q.detail, paths.get(q.path_hash)) for q in quarantined[:limit]]
        console.print(_quarantine_table("quarantine", rows, source is not None), highlight=False)
        if len(quarantined) > limit:
            console.print(f"  ... and {len(quarantined) - limit} more (--problems N)")
