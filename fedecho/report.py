"""Run reports from the run store: tables (shared by `fedecho runs show` and the HTML page) and PNG plots.

`write_report` builds DIR/index.html with its PNGs beside it: loss per round per phase, evaluation metrics per
site, bytes per round per site, privacy spent per site (when sites report "epsilon"), and server metrics.
The page needs nothing but those files (no scripts, no network); every text from the store is escaped.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedecho.storage.files import atomic_path
from fedecho.storage.store import SITES_SUFFIX, RoundRow, SiteResultRow, Store

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


@dataclass(frozen=True)
class Plot:
    file: str
    title: str


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


def _number(v: object) -> float | None:
    """A plottable float, or None (strings, lists, NaN and inf are not drawn)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


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


# ---------------------------------------------------------------- plots


def _phase_order(store: Store, run_id: int, rounds: list[RoundRow], results: list[SiteResultRow]) -> list[str]:
    order = [p.name for p in store.phases(run_id)]
    for name in [r.phase for r in rounds] + [x.phase for x in results]:
        if name not in order:
            order.append(name)
    return order


class _Steps:
    """One x axis across phases: every (phase, round) seen, phases in order, rounds ascending."""

    def __init__(self, phases: list[str], keys: Iterable[tuple[str, int]]) -> None:
        rank = {p: i for i, p in enumerate(phases)}
        self.keys = sorted(set(keys), key=lambda k: (rank.get(k[0], len(rank)), k[1]))
        self.x = {k: i + 1 for i, k in enumerate(self.keys)}

    def decorate(self, ax: Axes) -> None:
        """Mark where each phase starts, and label the axis."""
        seen: set[str] = set()
        for k in self.keys:
            if k[0] not in seen:
                seen.add(k[0])
                x = self.x[k]
                if x > 1:
                    ax.axvline(x - 0.5, color="0.6", linestyle=":", linewidth=1)
                ax.text(
                    x - 0.4, 0.98, k[0], transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="0.3",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1},
                )  # fmt: skip
        ax.set_xlabel("round (phases in order)")


def _figure(n: int, cols: int = 3, size: tuple[float, float] = (4.6, 3.4)) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    return fig, axes[:n]


def _save(fig: Figure, out: Path, name: str) -> None:
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
        tmp.chmod(0o644)  # the temporary file is private; a report is meant to be read, e.g. by a web server


def _series(points: dict[int, float]) -> tuple[list[int], list[float]]:
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def _site_values(
    results: list[SiteResultRow], key: Callable[[SiteResultRow], float | None], kinds: tuple[str, ...]
) -> dict[str, dict[tuple[str, int], float]]:
    """site -> (phase, round) -> value, from ok results of the given kinds (the last one wins)."""
    out: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    for x in results:
        if x.status == "ok" and x.kind in kinds and (v := key(x)) is not None:
            out[x.site][(x.phase, x.round)] = v
    return out


def _plot_loss(out: Path, phases: list[str], rounds: list[RoundRow], results: list[SiteResultRow]) -> Plot | None:
    """Per phase: aggregated train loss (thick), aggregated val loss (dashed), each site's train loss (thin)."""
    per_site = _site_values(results, lambda x: _number(x.metrics.get(LOSS)), ("train",))
    shown = [
        p
        for p in phases
        if any(r.phase == p and _number(r.train.get(LOSS)) is not None for r in rounds)
        or any(k[0] == p for site in per_site.values() for k in site)
    ]
    if not shown:
        return None
    fig, axes = _figure(len(shown))
    for ax, phase in zip(axes, shown, strict=True):
        agg = {r.round: v for r in rounds if r.phase == phase and (v := _number(r.train.get(LOSS))) is not None}
        val = {r.round: v for r in rounds if r.phase == phase and (v := _number(r.evaluate.get(VAL_LOSS))) is not None}
        for site in sorted(per_site):
            pts = {k[1]: v for k, v in per_site[site].items() if k[0] == phase}
            if pts:
                ax.plot(*_series(pts), linewidth=0.8, alpha=0.7, marker=".", label=site)
        if agg:
            ax.plot(*_series(agg), color="black", linewidth=2.2, marker="o", label="aggregated train")
        if val:
            ax.plot(*_series(val), color="black", linewidth=1.5, linestyle="--", marker="s", label="aggregated val")
        ax.set_title(f"{phase}: loss per round")
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out, "loss.png")
    return Plot("loss.png", "Loss per round, per phase: aggregated over sites (thick) and each site (thin)")


def _plot_site_metrics(
    out: Path, phases: list[str], rounds: list[RoundRow], results: list[SiteResultRow], limit: int = 12
) -> Plot | None:
    """One panel per (phase, evaluation metric): each site's value per round, and the aggregate in black."""
    panels: list[tuple[str, str]] = []
    for phase in phases:
        names = {
            k
            for x in results
            if x.phase == phase and x.kind == "evaluate" and x.status == "ok"
            for k, v in x.metrics.items()
            if k not in BOOKKEEPING and _number(v) is not None
        }
        panels += [(phase, k) for k in sorted(names)]
    if not panels:
        return None
    panels = panels[:limit]
    fig, axes = _figure(len(panels))
    for ax, (phase, name) in zip(axes, panels, strict=True):
        per_site = _site_values(
            [x for x in results if x.phase == phase], lambda x, n=name: _number(x.metrics.get(n)), ("evaluate",)
        )
        for site in sorted(per_site):
            ax.plot(*_series({k[1]: v for k, v in per_site[site].items()}), marker=".", linewidth=1, label=site)
        agg = {r.round: v for r in rounds if r.phase == phase and (v := _number(r.evaluate.get(name))) is not None}
        if agg:
            ax.plot(*_series(agg), color="black", linewidth=2, marker="o", label="aggregated")
        ax.set_title(f"{phase}: {name}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out, "site_metrics.png")
    return Plot("site_metrics.png", "Evaluation metrics per site and round (black: aggregated over sites)")


def _plot_bytes(out: Path, phases: list[str], results: list[SiteResultRow]) -> Plot | None:
    """Stacked bars per round: what each site downloaded and uploaded (train and evaluate together)."""
    if not any(x.bytes_down or x.bytes_up for x in results):
        return None
    steps = _Steps(phases, ((x.phase, x.round) for x in results))
    sites = sorted({x.site for x in results})
    down: dict[str, dict[int, float]] = {s: defaultdict(float) for s in sites}
    up: dict[str, dict[int, float]] = {s: defaultdict(float) for s in sites}
    for x in results:
        down[x.site][steps.x[(x.phase, x.round)]] += x.bytes_down / 2**20
        up[x.site][steps.x[(x.phase, x.round)]] += x.bytes_up / 2**20
    fig, axes = _figure(2, cols=2, size=(6.0, 3.6))
    xs = list(steps.x.values())
    for ax, data, what in ((axes[0], down, "down (server to site)"), (axes[1], up, "up (site to server)")):
        bottom = [0.0] * len(xs)
        for site in sites:
            heights = [data[site].get(x, 0.0) for x in xs]
            ax.bar(xs, heights, bottom=bottom, label=site, width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(f"bytes {what}")
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        steps.decorate(ax)
    _save(fig, out, "bytes.png")
    return Plot("bytes.png", "Traffic per round and site, in MiB (stacked over sites)")


def privacy_unit(metrics: dict[str, Any]) -> str:
    """What a site's reported epsilon protects: "patient", "video", or "-" (no DP, or a site too old to say)."""
    if "epsilon" not in metrics or "dp_per_patient" not in metrics:
        return "-"
    return "patient" if metrics["dp_per_patient"] else "video"


def _plot_privacy(out: Path, phases: list[str], results: list[SiteResultRow]) -> Plot | None:
    """Each site's privacy spent (epsilon) after each round, labelled with the unit that epsilon protects (the
    site's latest report); drawn only once sites report it."""
    eps = _site_values(results, lambda x: _number(x.metrics.get("epsilon")), ("train", "evaluate", "query"))
    if not eps:
        return None
    units = {x.site: privacy_unit(x.metrics) for x in results if "epsilon" in x.metrics}
    steps = _Steps(phases, (k for site in eps.values() for k in site))
    fig, axes = _figure(1, size=(7.0, 3.6))
    ax = axes[0]
    for site in sorted(eps):
        unit = units.get(site, "-")
        label = site if unit == "-" else f"{site} (per {unit})"
        ax.plot(*_series({steps.x[k]: v for k, v in eps[site].items()}), marker="o", label=label)
    ax.set_title("privacy spent per site")
    ax.set_ylabel("epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    steps.decorate(ax)
    _save(fig, out, "privacy.png")
    return Plot(
        "privacy.png",
        "Privacy spent (epsilon) per site, cumulative over rounds; per patient, or per video (a patient with k "
        "videos is protected about k times more weakly)",
    )


def _plot_server(out: Path, phases: list[str], rounds: list[RoundRow], limit: int = 6) -> Plot | None:
    """Metrics the server computed on the aggregated model (e.g. server_ef_mae), one panel per metric."""
    names = sorted({k for r in rounds for k, v in r.server.items() if _number(v) is not None})[:limit]
    if not names:
        return None
    steps = _Steps(phases, ((r.phase, r.round) for r in rounds))
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names, strict=True):
        pts = {steps.x[(r.phase, r.round)]: v for r in rounds if (v := _number(r.server.get(name))) is not None}
        ax.plot(*_series(pts), color="black", marker="o")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        steps.decorate(ax)
    _save(fig, out, "server_metrics.png")
    return Plot("server_metrics.png", "Server-side metrics of the aggregated model per round")


def write_plots(store: Store, run_id: int, out: Path) -> list[Plot]:
    """Draw every plot the run has data for into out; returns them in page order."""
    rounds = store.rounds(run_id)
    results = store.site_results(run_id)
    phases = _phase_order(store, run_id, rounds, results)
    plots = [
        _plot_loss(out, phases, rounds, results),
        _plot_site_metrics(out, phases, rounds, results),
        _plot_server(out, phases, rounds),
        _plot_bytes(out, phases, results),
        _plot_privacy(out, phases, results),
    ]
    return [p for p in plots if p is not None]


# ---------------------------------------------------------------- HTML

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
