"""`fedecho report RUN_ID --out DIR`: an HTML page with PNG plots of one run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedecho.cli.runs import SERVER, STATE, STORE, fail, open_store
from fedecho.report.html import write_report


def report(
    run_id: int = typer.Argument(..., help="Run id, as printed by `fedecho runs list`."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Folder for index.html and its PNG plots."),
    state: Path | None = STATE,
    store: str | None = STORE,
    server: Path | None = SERVER,
) -> None:
    """Write an HTML report of one run: loss, per-site metrics, bytes and privacy plots, and all its tables.

    Example: fedecho report 1 --server configs/server.toml --out reports/run1   (then open reports/run1/index.html)
    """
    s = open_store(state, store, server)
    try:
        page = write_report(s, run_id, out)
    except KeyError as e:
        raise fail(str(e.args[0])) from e
    except OSError as e:
        raise fail(f"cannot write the report to {out}: {e}") from e
    finally:
        s.close()
    Console().print(f"[green]report[/]: {page}")
