"""Run reports from the run store, one module per purpose, so a command loads only what it prints.

- tables.py: the run store as tables of display strings (`fedecho runs list|show`, and the report's tables),
  and the one-line round summaries of `fedecho server run` and `fedecho sim`.
- plots.py: the report's PNG plots; only drawing one imports matplotlib.
- html.py: the HTML page of one run (`fedecho report`), its tables and plots.

The names load on first use from their module: `from fedecho.report import TableData` reads tables.py only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedecho.report.html import render_html, write_report
    from fedecho.report.plots import Plot, write_plots
    from fedecho.report.tables import (
        BOOKKEEPING,
        LOSS,
        VAL_LOSS,
        TableData,
        fmt_bytes,
        fmt_metrics,
        fmt_round,
        fmt_time,
        fmt_value,
        privacy_unit,
        reached,
        run_tables,
        runs_table,
    )

# Listed twice on purpose: __all__ must be a literal for linters and type checkers to see the re-exports.
_MODULES = {
    "BOOKKEEPING": "tables",
    "LOSS": "tables",
    "VAL_LOSS": "tables",
    "TableData": "tables",
    "fmt_bytes": "tables",
    "fmt_metrics": "tables",
    "fmt_round": "tables",
    "fmt_time": "tables",
    "fmt_value": "tables",
    "privacy_unit": "tables",
    "reached": "tables",
    "run_tables": "tables",
    "runs_table": "tables",
    "Plot": "plots",
    "write_plots": "plots",
    "render_html": "html",
    "write_report": "html",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"fedecho.report.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BOOKKEEPING",
    "LOSS",
    "VAL_LOSS",
    "Plot",
    "TableData",
    "fmt_bytes",
    "fmt_metrics",
    "fmt_round",
    "fmt_time",
    "fmt_value",
    "privacy_unit",
    "reached",
    "render_html",
    "run_tables",
    "runs_table",
    "write_plots",
    "write_report",
]
