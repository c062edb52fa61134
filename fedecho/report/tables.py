"""The run store as tables of display strings, so `fedecho runs show` and the HTML report print the same thing.

Also the one-line summaries of a round and of a metrics dict that `fedecho server run` and `fedecho sim` print.
Nothing here draws: importing it loads no plotting library.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fedecho.storage.store import SITES_SUFFIX, SiteResultRow, Store

# Bookkeeping keys, not quality metrics: left out of the metric columns and the per-site metric plots.
BOOKKEEPING = frozenset({"num-examples", "num_examples", "seconds", "epsilon", "delta", "dp_per_patient"})
LOSS = "train_loss"
VAL_LOSS = "val_loss"


@dataclass(frozen=True)
class TableData:
    """A titled table of display strings: rendered by rich in the terminal and as HTML in the report."""

    title: str
    header: list[str]
    rows: list[list[str]]


# ---------------------------------------------------------------- formatting


def fmt_value(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: a 300 MB model update reads as 286.1 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_time(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_round(summary: dict[str, Any], skip: Iterable[str] = ()) -> str:
    """A round's one-line summary (`fedecho server run`, `fedecho sim`): `name value` pairs; a federated mean over
    fewer sites than the others (a metric undefined at some site) says over how many: `val_auroc 0.5 (2 sites)`."""
    skipped = set(skip)
    counts = {k: v for k, v in summary.items() if k.endswith(SITES_SUFFIX)}
    most = max(counts.values(), default=0)
    shown = []
    for k, v in summary.items():
        if k in skipped or k in counts:
            continue
        n = counts.get(k + SITES_SUFFIX)
        text = f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        shown.append(text + (f" ({int(n)} site{'s' if n != 1 else ''})" if n is not None and n < most else ""))
    return ", ".join(shown)


def fmt_metrics(metrics: dict[str, Any], skip: Iterable[str] = BOOKKEEPING) -> str:
    """`name=value` pairs; a federated mean says how many sites it is over (`<name>.sites`): `val_r2=0.5 (2 sites)`."""
    skipped = set(skip)
    shown = []
    for k, v in sorted(metrics.items()):
        if k in skipped or k.endswith(SITES_SUFFIX):
            continue
        n = metrics.get(k + SITES_SUFFIX)
        shown.append(f"{k}={fmt_value(v)}" + (f" ({int(n)} site{'s' if n != 1 else ''})" if n is not None else ""))
    return ", ".join(shown) or "-"


# ---------------------------------------------------------------- tables


def reached(store: Store, run_id: int) -> str:
    """How far a run got, e.g. "finetune 3/5": the phase and round of its last completed round."""
    last = store.last_round(run_id)
    if last is None:
        return "-"
    planned = {p.name: p.rounds for p in store.phases(run_id)}
    return f"{last.phase} {last.round}/{planned[last.phase]}" if last.phase in planned else f"{last.phase} {last.round}"


def runs_table(store: Store) -> TableData:
    """All runs, newest first: what `fedecho runs list` prints."""
    rows = []
    for r in store.list_runs():
        sites = {x.site for x in store.site_results(r.id)}
        rows.append([str(r.id), r.name, r.mode, r.status, reached(store, r.id), str(len(sites)), fmt_time(r.created)])
    return TableData("runs", ["id", "name", "mode", "status", "reached", "sites", "created"], rows)


def _bytes_by_round(results: list[SiteResultRow]) -> dict[tuple[str, int], tuple[int, int]]:
    out: dict[tuple[str, int], tuple[int, int]] = defaultdict(lambda: (0, 0))
    for x in results:
        down, up = out[(x.phase, x.round)]
        out[(x.phase, x.round)] = (down + x.bytes_down, up + x.bytes_up)
    return out


def run_tables(store: Store, run_id: int) -> list[TableData]:
    """The run's summary, phases, rounds, per-site results, checkpoints and events (raises KeyError if unknown)."""
    run = store.get_run(run_id)
    results = store.site_results(run_id)
    rounds = store.rounds(run_id)
    summary = TableData(
        f"run {run.id}: {run.name}",
        ["field", "value"],
        [
            ["status", run.status], ["message", run.message or "-"], ["mode", run.mode],
            ["Flower run id", fmt_value(run.flower_run_id)], ["reached", reached(store, run_id)],
            ["sites", ", ".join(sorted({x.site for x in results})) or "-"],
            ["created", fmt_time(run.created)], ["updated", fmt_time(run.updated)],
        ],
    )  # fmt: skip
    phases = TableData(
        "phases",
        ["phase", "rounds planned", "rounds completed", "status"],
        [[p.name, str(p.rounds), str(sum(r.phase == p.name for r in rounds)), p.status] for p in store.phases(run_id)],
    )
    traffic = _bytes_by_round(results)
    round_rows = []
    for r in rounds:
        down, up = traffic.get((r.phase, r.round), (0, 0))
        round_rows.append(
            [
                r.phase, str(r.round), f"{r.sites_replied}/{r.sites_sampled}", fmt_value(r.train.get(LOSS)),
                fmt_metrics(r.evaluate), fmt_metrics(r.server), fmt_bytes(down), fmt_bytes(up),
                f"{r.finished - r.started:.1f}",
            ]
        )  # fmt: skip
    rounds_t = TableData(
        "rounds",
        ["phase", "round", "replied/sampled", "train loss", "eval metrics", "server metrics", "down", "up", "seconds"],
        round_rows,
    )
    with_eps = any("epsilon" in x.metrics for x in results)
    site_header = ["phase", "round", "site", "kind", "status", "examples", "metrics"]
    site_header += ["epsilon", "privacy unit"] if with_eps else []
    site_header += ["down", "up", "reason"]
    site_rows = []
    for x in results:
        row = [x.phase, str(x.round), x.site, x.kind, x.status, str(x.num_examples), fmt_metrics(x.metrics)]
        row += [fmt_value(x.metrics.get("epsilon")), privacy_unit(x.metrics)] if with_eps else []
        row += [fmt_bytes(x.bytes_down), fmt_bytes(x.bytes_up), x.reason or "-"]
        site_rows.append(row)
    checkpoints = TableData(
        "checkpoints (newest first)",
        ["phase", "round", "path", "sha256", "saved"],
        [[c.phase, str(c.round), c.path, c.sha256, fmt_time(c.created)] for c in store.checkpoints(run_id)],
    )
    events = TableData(
        "events",
        ["time", "kind", "site", "message"],
        [[fmt_time(e.created), e.kind, e.site or "-", e.message] for e in store.events(run_id)],
    )
    return [summary, phases, rounds_t, TableData("per-site results", site_header, site_rows), checkpoints, events]


def privacy_unit(metrics: dict[str, Any]) -> str:
    """What a site's reported epsilon protects: "patient", "video", or "-" (no DP, or a site too old to say)."""
    if "epsilon" not in metrics or "dp_per_patient" not in metrics:
        return "-"
    return "patient" if metrics["dp_per_patient"] else "video"
