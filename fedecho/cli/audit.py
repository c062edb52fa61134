"""`fedecho audit`: the append-only audit logs, the server's (every reply) or a site's (every message)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from fedecho._toml import ConfigFileError
from fedecho.cli.runs import SERVER, STATE, STORE, fail, open_store, print_table
from fedecho.report.tables import TableData

if TYPE_CHECKING:
    from fedecho.client.config import SiteConfig


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
    server: Path | None = SERVER,
    run: int | None = typer.Option(None, "--run", help="Only this run (fedecho's run id; at a site also Flower's)."),
    site_name: str | None = typer.Option(None, "--site-name", help="Server log: only this site's replies."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the newest N rows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (full hashes) instead of a table."),
    ledger: bool = typer.Option(
        False,
        "--ledger",
        help="With --site: the site's privacy ledger (every DP-SGD round: noise, sample rate, steps, privacy unit, "
        "status) instead of its message log.",
    ),
    access: bool = typer.Option(
        False,
        "--access",
        help="Server: the access log (requests the public front refused, refused app bundles, "
        "site keys registered or removed) instead of the replies.",
    ),
) -> None:
    """Show an audit log: the server's record of every reply (or --access: of who tried what at the
    coordinator), or (--site) a site's record of every message.

    Examples: fedecho audit --server configs/server.toml --run 1;
    fedecho audit --server configs/server.toml --access; fedecho audit --site configs/site01.toml --limit 20
    """
    if site is not None:
        from fedecho.client.audit import SiteLog
        from fedecho.client.config import load_site_config

        try:
            cfg = load_site_config(site)
            if ledger:
                _show_ledger(cfg, limit, as_json)
                return
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
        summary = _ledger_summary(cfg)
        if summary:
            Console().print(summary, highlight=False)
        return
    if access:
        with open_store(state, store, server) as st:
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
    with open_store(state, store, server) as st:
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


def _ledger_summary(cfg: SiteConfig) -> str:
    """One line on the site's privacy spend, when its ledger has DP rounds (none: "")."""
    from fedecho.privacy.ledger import PrivacyLedger

    delta = cfg.privacy.delta
    with PrivacyLedger(cfg.state, create=False) as book:
        entries = book.entries()
        if not entries:
            return ""
        epsilon, per_patient = book.epsilon(delta), book.per_patient()
    return (
        f"privacy ledger: {len(entries)} DP-SGD round(s), epsilon {epsilon:.3f} at delta {delta:g} "
        f"{_guarantee(per_patient)} (`--ledger` lists them)"
    )


def _guarantee(per_patient: bool) -> str:
    return "per patient" if per_patient else "per video (a patient with k videos: about k times that)"


def _show_ledger(cfg: SiteConfig, limit: int | None, as_json: bool) -> None:
    """The site's privacy ledger: one row per DP-SGD round, with the privacy unit it protected."""
    from fedecho.privacy.ledger import PrivacyLedger

    delta = cfg.privacy.delta
    with PrivacyLedger(cfg.state, create=False) as book:
        entries = book.entries()
        epsilon, per_patient = book.epsilon(delta), book.per_patient()
    shown = entries[-limit:] if limit else entries
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(e) for e in shown], indent=1))
        return
    header = ["id", "time", "run", "phase", "round", "noise", "sample rate", "steps", "unit", "status"]
    rows = [
        [str(e.id), _when(e.created), e.run, e.phase, str(e.round), f"{e.noise_multiplier:g}", f"{e.sample_rate:.4g}",
         str(e.steps), e.unit, e.status]
        for e in shown
    ]  # fmt: skip
    title = (
        f"privacy ledger of site {cfg.name}: epsilon {epsilon:.3f} at delta {delta:g} "
        f"{_guarantee(per_patient) if entries else ''}"
    )
    print_table(TableData(title, header, rows), Console())
