"""`fedecho audit`: the append-only audit logs, the server's (every reply) or a site's (every message)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from fedecho._toml import ConfigFileError
from fedecho.cli.runs import STATE, STORE, fail, open_store, print_table
from fedecho.report import TableData


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _short(h: str | None) -> str:
    return (h or "")[:12]


def _opt(v: object) -> str:
    return "" if v is None else str(v)


def audit(
    site: Path | None = typer.Option(
        None, "--site", exists=True, dir_okay=False, help="A site's site.toml: show that site's own log."
    ),
    state: Path | None = STATE,
    store: str | None = STORE,
    run: int | None = typer.Option(None, "--run", help="Only this run (fedecho's run id; at a site also Flower's)."),
    site_name: str | None = typer.Option(None, "--site-name", help="Server log: only this site's replies."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the newest N rows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (full hashes) instead of a table."),
    access: bool = typer.Option(
        False,
        "--access",
        help="Server: the access log (requests the public front refused, refused app bundles, "
        "site keys registered or removed) instead of the replies.",
    ),
) -> None:
    """Show an audit log: the server's record of every reply (or --access: of who tried what at the
    coordinator), or (--site) a site's record of every message.

    Examples: fedecho audit --state runs/deploy/server --run 3; fedecho audit --state runs/deploy/server --access;
    fedecho audit --site site.toml --limit 20
    """
    if site is not None:
        from fedecho.client.audit import SiteLog
        from fedecho.client.config import load_site_config

        try:
            cfg = load_site_config(site)
            with SiteLog(cfg.state, create=False) as log:
                site_rows = log.rows(run, limit)
        except (ConfigFileError, FileNotFoundError, SQLAlchemyError) as e:
            raise fail(str(e)) from e
        if as_json:
            typer.echo(json.dumps([dataclasses.asdict(r) for r in site_rows], indent=1))
            return
        header = ["id", "time", "run", "flower run", "round", "phase", "message", "decision", "reason", "bundle",
                  "manifest", "epsilon", "update sha256", "bytes"]  # fmt: skip
        rows = [
            [str(r.id), _when(r.created), _opt(r.run_id), _opt(r.flower_run_id), _opt(r.round), r.phase,
             r.message_type, r.decision, r.reason, _short(r.bundle_sha256), _short(r.manifest_sha256),
             _opt(r.epsilon), _short(r.update_sha256), str(r.update_bytes)]
            for r in site_rows
        ]  # fmt: skip
        print_table(TableData(f"audit log of site {cfg.name} ({cfg.state / 'site.db'})", header, rows), Console())
        return
    if access:
        with open_store(state, store) as st:
            try:
                access_rows = st.access(limit)
            except SQLAlchemyError:  # a store written before the access log existed
                access_rows = []
        if as_json:
            typer.echo(json.dumps([dataclasses.asdict(r) for r in access_rows], indent=1))
            return
        header = ["id", "time", "source", "kind", "request", "decision", "reason"]
        rows = [[str(r.id), _when(r.created), r.source, r.kind, r.request, r.decision, r.reason] for r in access_rows]
        print_table(TableData("server access log", header, rows), Console())
        return
    with open_store(state, store) as st:
        try:
            server_rows = st.audit(run, site_name, limit)
        except SQLAlchemyError:  # a store written before the audit table existed
            server_rows = []
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in server_rows], indent=1))
        return
    header = ["id", "time", "run", "phase", "round", "kind", "site", "status", "reason", "bytes down", "bytes up",
              "sha256"]  # fmt: skip
    rows = [
        [str(r.id), _when(r.created), str(r.run_id), r.phase, str(r.round), r.kind, r.site, r.status, r.reason,
         str(r.bytes_down), str(r.bytes_up), _short(r.sha256)]
        for r in server_rows
    ]  # fmt: skip
    print_table(TableData("server audit log", header, rows), Console())
