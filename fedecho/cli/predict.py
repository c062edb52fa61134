"""`fedecho predict INPUT --checkpoint CKPT`: the heads' estimates for one video, or for many into a CSV.

INPUT is an AVI or DICOM cine (a table on the console), or a folder, a quoted glob pattern or a CSV list
(one row per video in --out). Both forms go through fedecho.predict.predict_video.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedecho.storage.files import atomic_write_csv

if TYPE_CHECKING:
    from fedecho.predict import Prediction

SAVE_EVERY_S = 10.0  # a long batch rewrites its CSV this often, so a crash keeps the rows done so far


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _table(p: Prediction) -> Table:
    from fedecho.data.records import AS_CLASSES

    table = Table(title=f"{p.file.name}: {p.frames} frames, {p.clips} clips averaged")
    table.add_column("head")
    table.add_column("estimate", justify="right")
    units = {"ef": "% (LVEF)", "esv": "mL", "edv": "mL"}
    for name, value in p.estimates.items():
        if name == "ef_class":
            table.add_row(name, f"P(EF >= threshold) = {float(value):.3f}")
        elif name == "as_class":
            table.add_row(name, ", ".join(f"{c} {p:.2f}" for c, p in zip(AS_CLASSES, value, strict=True)))
        else:
            table.add_row(name, f"{float(value):.1f} {units.get(name, '')}")
    return table


def predict(
    video: str = typer.Argument(
        ...,
        metavar="INPUT",
        help="An .avi or DICOM cine; or a folder (searched recursively), a quoted glob pattern such as "
        "'data/*.avi', or a CSV list with a file, path or FileName column (EchoNet's FileList.csv).",
    ),
    checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, dir_okay=False, help="Fine-tuned checkpoint."),
    out: Path | None = typer.Option(
        None, "--out", dir_okay=False, help="CSV of the estimates, one row per video (required for many videos)."
    ),
    period: int = typer.Option(
        0, "--period", min=0, help="Clip convention: 0 spreads frames evenly; k takes every k-th."
    ),
    max_clips: int = typer.Option(0, "--max-clips", min=0, help="Average over at most this many clips (0: all)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda."),
) -> None:
    """LVEF (and every other head of the checkpoint), averaged over all clips of each video.

    Example: fedecho predict data/phantom/Videos/0X1A2B.avi --checkpoint runs/tiny/finetune/model.safetensors

    Many: fedecho predict data/phantom --checkpoint runs/tiny/finetune/model.safetensors --out predictions.csv
    """
    from fedecho._env import set_torch_threads
    from fedecho.models import CheckpointError
    from fedecho.predict import InputError, columns, expand_input, load_predictor, row, try_predict
    from fedecho.train import pick_device

    if out is not None and out.is_dir():
        raise _fail(f"--out {out}: is a folder; give a CSV file name")
    if out is not None and Path(video).is_file() and out.resolve() == Path(video).resolve():
        raise _fail(f"--out {out}: is the input itself; give another file name")
    try:
        videos, single = expand_input(video)
    except InputError as e:
        raise _fail(str(e)) from e
    if len(videos) > 1 and out is None:
        raise _fail(f"{video}: names {len(videos)} videos; give --out predictions.csv for their estimates")
    set_torch_threads()
    try:
        model = load_predictor(checkpoint, pick_device(device))
    except CheckpointError as e:
        raise _fail(str(e)) from e
    tasks = model.cfg.tasks
    if single or (len(videos) == 1 and out is None):  # one video and nowhere to write: show it as the table
        p = try_predict(model, videos[0], period, max_clips)
        if out is not None:
            atomic_write_csv(out, columns(tasks), [row(p, tasks)])
        if p.error:
            raise _fail(p.error)
        Console().print(_table(p))
        return
    results: list[Prediction] = []
    saved = time.monotonic()
    bar = Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        transient=True,
        disable=not Console().is_terminal,  # logs and pipes get the summary only
    )
    with bar:
        job = bar.add_task("predict", total=len(videos), status="")
        for path in videos:
            bar.update(job, status=path.name)
            results.append(try_predict(model, path, period, max_clips))
            bar.advance(job)
            if out is not None and time.monotonic() - saved > SAVE_EVERY_S:
                atomic_write_csv(out, columns(tasks), [row(r, tasks) for r in results])
                saved = time.monotonic()
    failed = [r for r in results if r.error]
    if out is not None:
        atomic_write_csv(out, columns(tasks), [row(r, tasks) for r in results])
    console = Console(highlight=False, soft_wrap=True)
    for r in failed[:10]:
        console.print(f"[yellow]failed:[/] {r.error}")
    if len(failed) > 10:
        console.print(f"[yellow]... and {len(failed) - 10} more failed (see the error column)")
    where = f"; wrote {out}" if out is not None else ""
    console.print(f"predicted {len(results) - len(failed)} of {len(results)} videos, {len(failed)} failed{where}")
    if len(failed) == len(results):
        raise typer.Exit(1)
