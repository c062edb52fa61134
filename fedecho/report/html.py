"""The HTML report of one run, written by `fedecho report`: DIR/index.html with the run's tables and its PNG plots.

The page needs nothing but those files (no scripts, no network); every text from the store is escaped.
"""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fedecho.report.tables import TableData, fmt_time, run_tables
from fedecho.storage.files import atomic_path
from fedecho.storage.store import Store

if TYPE_CHECKING:
    from fedecho.report.plots import Plot

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.code { font-family: monospace; word-break: break-all; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
.muted { color: #777; }
"""


def _html_table(t: TableData) -> str:
    e = html.escape
    if not t.rows:
        return f"<h2>{e(t.title)}</h2>\n<p class='muted'>none</p>\n"
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    code_cols = {i for i, h in enumerate(t.header) if h in ("sha256", "path")}
    cells = (
        "".join(f"<td{' class=code' if i in code_cols else ''}>{e(c)}</td>" for i, c in enumerate(row))
        for row in t.rows
    )
    body = "\n".join(f"<tr>{c}</tr>" for c in cells)
    return f"<h2>{e(t.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"


def render_html(title: str, tables: list[TableData], plots: list[Plot], config_toml: str) -> str:
    """The report page: summary first, then plots, then the detail tables and the run config."""
    e = html.escape
    summary, *rest = tables
    figures = (
        "\n".join(
            f'<figure><img src="{e(p.file)}" alt="{e(p.title)}"><figcaption>{e(p.title)}</figcaption></figure>'
            for p in plots
        )
        or "<p class='muted'>no completed rounds or site results to plot yet</p>"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='muted'>fedecho report written {e(fmt_time(datetime.now().timestamp()))}</p>",
        _html_table(summary),
        "<h2>plots</h2>",
        figures,
        *(_html_table(t) for t in rest),
        "<h2>run config</h2>",
        f"<pre>{e(config_toml) or '(empty)'}</pre>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def write_report(store: Store, run_id: int, out: str | Path) -> Path:
    """Write out/index.html and its PNGs for one run; returns the page's path (KeyError if the run is unknown)."""
    from fedecho.report.plots import write_plots  # the plotting code loads only when a report is written

    out = Path(out)
    run = store.get_run(run_id)
    tables = run_tables(store, run_id)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(store, run_id, out)
    page = out / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text(render_html(f"fedecho run {run.id}: {run.name}", tables, plots, run.config_toml), "utf-8")
        tmp.chmod(0o644)
    return page
