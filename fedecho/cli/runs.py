"""`fedecho runs list|show`: federated runs recorded in the run store."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from fedecho.report.tables import TableData, run_tables, runs_table
from fedecho.storage.store import Store, StoreMissing, state_db_path

app = typer.Typer(help="Federated runs recorded in the run store: list them, show one.", no_args_is_help=True)

STATE = typer.Option(
    None, "--state", help="State folder holding fedecho.db (default: $FEDECHO_STATE, else ./fedecho-state)."
)
STORE = typer.Option(
    None, "--store", help="SQLAlchemy URL of the store, overrides --state (e.g. postgresql://user@host/fedecho)."
)
SERVER = typer.Option(
    None,
    "--server",
    "-s",
    dir_okay=False,
    help="The coordinator's server config (e.g. configs/server.toml): read the store it names "
    "(its store URL, else fedecho.db in its state folder).",
)
DEFAULT_SERVER_CONFIG = Path("configs/server.toml")  # where the README walk-through keeps it


def fail(message: str) -> typer.Exit:
    """Print an error to stderr; the caller raises the returned exit (code 2: bad input, not a crash)."""
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(2)


def store_location(state: Path | None, store: str | None, server: Path | None) -> tuple[str, str]:
    """(the store's SQLAlchemy URL, how it was chosen) for every command that reads the store: --store URL, else
    the store --server's config names, else --state DIR, else $FEDECHO_STATE, else ./fedecho-state."""
    if server is not None and (state is not None or store is not None):
        raise fail("--server reads the store from the server config: give it without --state or --store")
    if store:
        return store, "--store"
    if server is not None:
        from fedecho._toml import ConfigFileError
        from fedecho.server.config import load_server_config
        from fedecho.server.submit import coordinator_store

        try:
            return coordinator_store(load_server_config(server)), "--server"
        except ConfigFileError as e:
            raise fail(str(e)) from e
    how = "--state" if state is not None else "$FEDECHO_STATE" if os.environ.get("FEDECHO_STATE") else "default"
    return f"sqlite:///{state_db_path(state)}", how


def _missing(e: StoreMissing, how: str, server: Path | None) -> str:
    """What a reading command says when there is no store where it looked: where, and how to point it at one."""
    if how == "--store":
        return str(e)
    if how == "--server":
        return f"{e}: the store of {server}, written at the coordinator's first run"
    looked = {"default": "; no --state, --store or --server was given and FEDECHO_STATE is not set",
              "$FEDECHO_STATE": f" ($FEDECHO_STATE={os.environ.get('FEDECHO_STATE', '')})"}.get(how, "")  # fmt: skip
    hint = (
        ". A deployment keeps its store in its state folder ([server].state of the server config): pass "
        "--server configs/server.toml to read it from there, or --state DIR, or --store URL, or set FEDECHO_STATE."
    )
    if how == "default" and DEFAULT_SERVER_CONFIG.is_file():
        hint += f" Here: fedecho runs list --server {DEFAULT_SERVER_CONFIG}"
    return f"{e}{looked}{hint}"


def open_store(state: Path | None, store: str | None, server: Path | None = None) -> Store:
    """Open an existing store for reading; never creates one (a typo in --state must not make an empty store)."""
    url, how = store_location(state, store, server)
    try:
        return Store(url, create=False)
    except StoreMissing as e:
        raise fail(_missing(e, how, server)) from e
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
def list_runs(state: Path | None = STATE, store: str | None = STORE, server: Path | None = SERVER) -> None:
    """List all runs, newest first: status, the phase and round reached, how many sites took part.

    Examples: fedecho runs list --server configs/server.toml (a coordinator's runs);
    fedecho runs list --state fedecho-state (fedecho sim's)
    """
    s = open_store(state, store, server)
    try:
        t = runs_table(s)
    finally:
        s.close()
    if t.rows:
        print_table(t)
        Console().print(Text(f"store: {s.shown_url}", style="dim"))
    else:
        Console().print(Text(f"no runs in {s.shown_url}"))


@app.command()
def show(
    run_id: int = typer.Argument(..., help="Run id, as printed by `fedecho runs list`."),
    state: Path | None = STATE,
    store: str | None = STORE,
    server: Path | None = SERVER,
) -> None:
    """Show one run: phases, every round, each site's results (with epsilon under DP), checkpoints, events.

    Example: fedecho runs show 1 --server configs/server.toml
    """
    s = open_store(state, store, server)
    try:
        tables = run_tables(s, run_id)
    except KeyError as e:
        raise fail(str(e.args[0])) from e
    finally:
        s.close()
    console = Console()
    for t in tables:
        print_table(t, console)
