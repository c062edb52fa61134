"""`fedecho sim`: a federated run rehearsed on one machine or a Ray cluster (Flower simulation engine, Ray)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedecho.report.tables import fmt_round
from fedecho.storage.store import DEFAULT_STATE, Store, store_url


def _fail(e: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}")
    return typer.Exit(2)


def sim(
    config: Path = typer.Option(
        ..., "--config", "-c", exists=True, dir_okay=False, help="Federated run file, e.g. configs/quickstart.toml."
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Per-site dataset folders (site01/, site02/, ...) or one dataset to partition. "
        "Default: a fresh phantom with --sites sites in STATE/phantom.",
    ),
    sites: int | None = typer.Option(
        None, "--sites", "-k", min=1, help="Virtual sites (default: all site folders, or 3)."
    ),
    videos: int = typer.Option(240, "--videos", min=3, help="Phantom videos over all sites, when no --data is given."),
    state: Path = typer.Option(Path(DEFAULT_STATE), "--state", help="State folder: store, checkpoints, caches."),
    store: str | None = typer.Option(None, "--store", help="SQLAlchemy URL of the store (default: SQLite in --state)."),
    resume: int = typer.Option(0, "--resume", help="Continue this stopped run from its last completed round."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="The server's own held-out dataset (test split)."),
    compare: bool = typer.Option(
        False, "--compare", help="Also train pooled and local-only at equal compute (FLamby protocol); table + plot."
    ),
    compare_batch: int | None = typer.Option(
        None, "--compare-batch", min=1, help="Batch size of the pooled and local-only baselines (default: a site's)."
    ),
    cpus_per_site: float | None = typer.Option(
        None,
        "--cpus-per-site",
        min=0.1,
        help="CPUs each virtual site reserves in Ray, and its torch threads (default: 1, or an equal share "
        "between --parallel-sites).",
    ),
    gpus_per_site: float | None = typer.Option(
        None,
        "--gpus-per-site",
        min=0.0,
        help="GPUs each virtual site reserves: a fraction shares one (default: the GPUs shared between the sites "
        "that train at once, at most 1 each; 0 without GPUs).",
    ),
    parallel_sites: int | None = typer.Option(
        None,
        "--parallel-sites",
        min=1,
        help="Virtual sites that train at once; they share the CPUs and GPUs (default: as many as the CPUs hold "
        "at --cpus-per-site).",
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Run on this existing Ray cluster (HOST:PORT, as `ray start --head` printed; run from one of its "
        "nodes) instead of a private Ray on this machine; the cluster's token is the environment's RAY_AUTH_*.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a federated pre-training + fine-tuning job with N virtual hospitals on this machine (or a Ray cluster).

    Example: fedecho sim --config configs/quickstart.toml --sites 3
    """
    from fedecho.data import SourceError
    from fedecho.fl.config import load_fed_run_config
    from fedecho.models import CheckpointError
    from fedecho.server.rounds import RoundFailed
    from fedecho.sim.cluster import plan_ray
    from fedecho.sim.run import simulate, site_layout
    from fedecho.train import ConfigError

    console = Console()
    try:
        cfg = load_fed_run_config(config)
    except ConfigError as e:
        raise _fail(e) from e
    if not verbose:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        # run_simulation is deprecated in favour of `flwr run`, which starts a detached SuperLink and
        # installs dependencies: fedecho deliberately keeps the in-process engine, so spare users the notice.
        flwr_log.addFilter(lambda record: "DEPRECATED FEATURE" not in record.getMessage())
    try:  # before any data is generated: a reservation nobody can hold would otherwise wait forever in Ray
        count = len(site_layout(data, sites)[0]) if data is not None else sites or 3
        plan = plan_ray(count, cpus_per_site, gpus_per_site, parallel_sites, ray_address)
    except ValueError as e:
        raise _fail(e) from e
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(escape(plan.describe()), style="dim")
    if data is None:
        data = _phantom(state, sites or 3, videos, console)
    total = sum(cfg.phase(p).rounds for p in cfg.phases)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[status]}"), console=console) as bar:
        job = bar.add_task(f"federated {cfg.run.name}", total=total, status="")

        def on_round(phase: str, server_round: int, summary: dict[str, Any]) -> None:
            numbers = {k: v for k, v in summary.items() if isinstance(v, float) and k != "seconds"}
            bar.console.print(f"{phase} round {server_round}: sites {summary.get('sites')}  {fmt_round(numbers)}")
            bar.update(job, advance=1, status=f"{phase} {server_round}")

        try:
            run_id = simulate(
                cfg, data, state, sites=sites, store=store, resume=resume, eval_data=eval_data,
                on_round=on_round, plan=plan,
            )  # fmt: skip
        except (ConfigError, SourceError, CheckpointError, ValueError, KeyError) as e:
            raise _fail(e) from e
        except RoundFailed as e:  # the run paused (too few sites): the store says so, resumable with --resume
            Console(stderr=True).print(
                f"[yellow]paused:[/] {escape(str(e))}; continue it with --resume and the same options"
            )
            raise typer.Exit(3) from e
    show_results(Store(store_url(state, store)), run_id, console)
    if compare:
        from fedecho.sim.compare import compare_runs

        compare_runs(cfg, data, state, run_id, sites=sites, store=store, console=console, batch_size=compare_batch)


def _phantom(state: Path, sites: int, videos: int, console: Console) -> Path:
    from fedecho.synth import synthesize

    out = state / "phantom"
    if not (out / "phantom.json").is_file():
        console.print(f"generating a {sites}-site phantom ({videos} videos) in {out}")
        synthesize(out, videos=videos, sites=sites, fmt="echonet", seed=20)  # 3 sites: 10 validation videos each
    return out


def show_results(store: Store, run_id: int, console: Console) -> None:
    """The run's rounds as a table: what `make demo` ends with."""
    rounds = store.rounds(run_id)
    table = Table(title=f"fedecho run {run_id}: {store.get_run(run_id).name} ({store.get_run(run_id).status})")
    keys: list[str] = []
    for r in rounds:
        for k in [*r.train, *r.evaluate, *r.server]:
            if k not in keys and (k == "train_loss" or k.endswith(("_loss", "_mae", "_r2", "_auroc"))):
                keys.append(k)
    table.caption = "val_*: the sites' VAL splits, weighted by videos; server_*: the server's own held-out set"
    table.add_column("phase", no_wrap=True, min_width=8)
    for col in ("round", "sites", *keys):
        table.add_column(col.replace("_", " "), justify="right")  # spaces let narrow terminals wrap headers
    for r in rounds:
        values = {**r.train, **r.evaluate, **r.server}
        table.add_row(
            r.phase, str(r.round), f"{r.sites_replied}/{r.sites_sampled}",
            *[f"{values[k]:.4g}" if k in values else "" for k in keys],
        )  # fmt: skip
    console.print(table)
    console.print(
        f"store: {store.url}   details: fedecho runs show {run_id}   report: fedecho report {run_id} --out DIR"
    )


__all__ = ["show_results", "sim"]
