"""PNG plots of one run, kept apart from the tables so that only writing a report loads matplotlib.

Loss per round per phase, evaluation metrics per site, bytes per round per site, privacy spent per site (when
sites report "epsilon") and server metrics; matplotlib itself is imported when the first figure is made.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedecho.report.tables import BOOKKEEPING, LOSS, VAL_LOSS, privacy_unit
from fedecho.storage.files import atomic_path
from fedecho.storage.store import RoundRow, SiteResultRow, Store

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Plot:
    """A PNG written into the report folder, and its caption."""

    file: str
    title: str


def _number(v: object) -> float | None:
    """A plottable float, or None (strings, lists, NaN and inf are not drawn)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


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
