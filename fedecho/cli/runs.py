"""`fedecho runs list|show`: federated runs recorded in the run store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from fedecho.report import TableData, run_tables, runs_table
from fedecho.storage.store import Store, StoreMissing, state_db_path

app = typer.Typer(help="Federated runs recorded in the run store: list them, show one.", no_args_is_help=True)

STATE = typer.Option(
    None, "--state", help="State folder holding fedecho.db (default: $FEDECHO_STATE, else ./fedecho-state)."
)
STORE = typer.Option(
    None, "--store", help="SQLAlchemy URL of the store, overrides --state (e.g. postgresql://user@host/fedecho)."
)


def fail(message: str) -> typer.Exit:
    """Print an error to stderr; the caller raises the returned exit (code 2: bad input, not a crash)."""
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(2)


def open_store(state: Path | None, store: str | None) -> Store:
    """Open an existing store for reading; never creates one (a typo in --state must not make an empty store)."""
    url = store or f"sqlite:///{state_db_path(state)}"
    try:
        return Store(url, create=False)
    except StoreMissing as e:
        hint = "" if store else " (pass --state DIR or --store URL, or set FEDECHO_STATE)"
        raise fail(f"{e}{hint}") from e
    except (SQLAlchemyError, ValueError, ImportError) as e:  # bad URL, unreachable server, missing DB driver
        raise fail(f"cannot open the store {url.split('@')[-1] if store else url}: {e}") from e


def print_table(t: TableData, console: Console | None = None) -> None:
    """A rich table of plain text: names and messages from the store are never read as rich markup."""
    console = console or Console()
    if not t.rows:
        console.print(Text.assemble((t.title, "bold"), ": none"))
        return
    table = Table(title=Text(t.title), title_justify="left")
    for h in t.header:
        table.add_column(h, overflow="fold")
    for row in t.rows:
        table.add_row(*(Text(c) for c in row))
    console.print(table)


@app.command("list")
def list_runs(state: Path | None = STATE, store: str | None = STORE) -> None:
    """List all runs, newest first: status, the phase and round reached, how many sites took part.

    Example: fedecho runs list --state fedecho-state
    """
    s = open_store(state, store)
    try:
        t = runs_table(s)
    finally:
        s.close()
    if t.rows:
        print_table(t)
    else:
        Console().print(Text(f"no runs in {s.shown_url}"))


@app.command()
def show(
    run_id: int = typer.Argument(..., help="Run id, as printed by `fedecho runs list`."),
    state: Path | None = STATE,
    store: str | None = STORE,
) -> None:
    """Show one run: phases, every round, each site's results (with epsilon under DP), checkpoints, events.

    Example: fedecho runs show 3 --state fedecho-state
    """
    s = open_store(state, store)
    try:
        tables = run_tables(s, run_id)
    except KeyError as e:
        raise fail(str(e.args[0])) from e
    finally:
        s.close()
    console = Console()
    for t in tables:
        print_table(t, console)
