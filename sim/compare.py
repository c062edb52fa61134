"""`fedecho sim --compare`: federated against pooled and local-only training at equal compute.

The FLamby protocol: with R rounds of E local epochs, every site's data is seen R x E times in the
federation; pooled training (all sites' training videos in one place, which hospitals cannot do)
and local-only training (each site alone) get the same R x E epochs, with the same recipe
(optimiser, learning rate, warm-up of R_w x E epochs, then cosine). Every model is scored on every
site's test split; "all sites" weighs each site by its test videos. A table and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import ConcatDataset, DataLoader

from fedecho.client.local import Site, build_model, site_datasets
from fedecho.data import EchoVideoDataset
from fedecho.fl.config import FedPhaseSection, FedRunConfig, round_seed
from fedecho.fl.strategies import server_optimizer_params
from fedecho.models import EchoVisionFM, load_checkpoint
from fedecho.sim.run import SimSites, site_layout
from fedecho.storage import Store
from fedecho.storage.files import atomic_write_bytes
from fedecho.storage.store import store_url
from fedecho.train import Trainer, evaluate, pick_device


def centralized(
    cfg: FedRunConfig, phase: str, sites: list[Site], model: EchoVisionFM, batch_size: int | None = None
) -> EchoVisionFM:
    """Train on the union of the sites' training videos for as many videos as the federation's sites
    see in the phase; `batch_size` (default: a site's) lets the baseline train at its own batch."""
    pcfg = cfg.phase(phase)
    batch = batch_size or pcfg.batch_size
    seed = round_seed(cfg.run.seed, phase, 0, "+".join(s.name for s in sites))
    torch.manual_seed(seed)
    parts: list[EchoVideoDataset] = []
    for site in sites:
        train = site_datasets(cfg, model, phase, site, seed)["train"]
        train.prepare(progress=False)
        if phase == "finetune" and cfg.local.data.label_fraction < 1:
            train.limit(cfg.local.data.label_fraction, pcfg.seed)
        parts.append(train)
    pooled = ConcatDataset(parts)
    steps_per_epoch = (len(pooled) + batch - 1) // batch
    if pcfg.steps:  # equal compute: the videos of the federation's steps at every site, summed
        epochs = max(1, round(pcfg.rounds * pcfg.steps * pcfg.batch_size * len(sites) / max(len(pooled), 1)))
    else:
        epochs = pcfg.rounds * pcfg.epochs
    warmup = epochs * pcfg.warmup_rounds / max(pcfg.rounds, 1)  # the same fraction of training as the federation's
    run_cfg = dataclasses.replace(centralized_recipe(cfg, phase), epochs=epochs, warmup_epochs=warmup, seed=seed)
    trainer = Trainer(model, phase, run_cfg, steps_per_epoch, pick_device())  # type: ignore[arg-type]
    for epoch in range(epochs):
        for part in parts:
            part.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        trainer.train_epoch(DataLoader(pooled, batch_size=batch, shuffle=True, generator=gen))
    return model


def centralized_recipe(cfg: FedRunConfig, phase: str) -> FedPhaseSection:
    """The optimiser a centralised run needs to match the federation's: the phase's own, except that
    one local SGD step under a server optimiser (FedAdam, FedYogi) is Adam on the union of the sites'
    batches, so the baseline trains AdamW with the server's step size and betas."""
    pcfg = cfg.phase(phase)
    params = server_optimizer_params(cfg.strategy_name, cfg.strategy_params)
    if pcfg.optimizer != "sgd" or params is None:
        return pcfg
    eta = float(params["eta"])
    return dataclasses.replace(
        pcfg, optimizer="adamw", lr=eta, min_lr=pcfg.min_lr * eta / pcfg.lr,
        betas=[float(params["beta_1"]), float(params["beta_2"])],
    )  # fmt: skip


def score(cfg: FedRunConfig, model: EchoVisionFM, sites: list[Site]) -> dict[str, dict[str, float]]:
    """Metrics on each site's test split, and over all sites (weighted by test videos)."""
    tasks = list(cfg.phase("finetune").tasks)
    out: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    videos = 0.0
    for site in sites:
        test = site_datasets(cfg, model, "finetune", site, cfg.phase("finetune").seed)["test"]
        test.prepare(progress=False)
        if not len(test):
            continue
        m = evaluate(model, test, tasks)
        out[site.name] = m
        n = m["videos"]
        videos += n
        for k, v in m.items():
            if k != "videos":
                totals[k] = totals.get(k, 0.0) + n * v
    out["all sites"] = {"videos": videos, **{k: v / videos for k, v in totals.items()}} if videos else {}
    return out


def _trained(cfg: FedRunConfig, sites: list[Site], batch_size: int | None) -> EchoVisionFM:
    """Pre-train (when the run does), then fine-tune, on these sites' pooled data."""
    encoder = None
    if cfg.phase("pretrain").rounds:
        encoder = centralized(cfg, "pretrain", sites, build_model(cfg, "pretrain"), batch_size)
    torch.manual_seed(round_seed(cfg.run.seed, "finetune", 0))
    model = build_model(cfg, "finetune")
    if encoder is not None:
        model.load_state_dict({k: v for k, v in encoder.state_dict().items() if k.startswith("encoder.")}, strict=False)
    return centralized(cfg, "finetune", sites, model, batch_size)


def compare_runs(
    cfg: FedRunConfig,
    data: Path,
    state: Path,
    run_id: int,
    sites: int | None = None,
    store: str | None = None,
    console: Console | None = None,
    batch_size: int | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Federated (the finished run's final model) vs pooled vs each site alone; writes JSON + PNG.
    `batch_size` is the baselines' (default: a site's batch in each phase)."""
    console = console or Console()
    if "finetune" not in cfg.phases:
        raise ValueError("--compare needs a fine-tuning phase (the comparison is on the task metrics)")
    state = Path(state).resolve()
    names, folders, partitioned = site_layout(data, sites)
    resolver = SimSites(names, [f.resolve() for f in folders], partitioned, state / "cache", state)
    site_list = [resolver.site(k) for k in range(len(names))]
    db = Store(store_url(state, store))
    final = next(c for c in db.checkpoints(run_id) if c.phase == "finetune")
    results: dict[str, dict[str, dict[str, float]]] = {"federated": score(cfg, load_checkpoint(final.path), site_list)}
    console.print("training pooled (all sites' data in one place) at equal compute ...")
    results["pooled"] = score(cfg, _trained(cfg, site_list, batch_size), site_list)
    for site in site_list:
        console.print(f"training {site.name} alone at equal compute ...")
        results[f"local: {site.name}"] = score(cfg, _trained(cfg, [site], batch_size), site_list)
    out = state / f"compare-run-{run_id:04d}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "compare.json", json.dumps(results, indent=2).encode())
    metric = _headline(cfg)
    _table(results, names, metric, console)
    _plot(results, [*names, "all sites"], metric, out / "compare.png")
    console.print(f"written: {out / 'compare.json'}, {out / 'compare.png'}")
    return results


def _headline(cfg: FedRunConfig) -> str:
    task = cfg.phase("finetune").tasks[0]
    return f"{task}_mae" if task in ("ef", "esv", "edv") else f"{task}_auroc"


def _table(results: dict[str, Any], names: list[str], metric: str, console: Console) -> None:
    table = Table(title=f"test {metric} by training set (rows) and test site (columns), equal compute")
    for col in ("trained on", *names, "all sites"):
        table.add_column(col, justify="left" if col == "trained on" else "right")
    for label, per_site in results.items():
        cells = [f"{per_site[n][metric]:.3f}" if metric in per_site.get(n, {}) else "-" for n in [*names, "all sites"]]
        table.add_row(label, *cells)
    console.print(table)


def _plot(results: dict[str, Any], columns: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(columns), 3.6))
    width = 0.8 / max(len(results), 1)
    for i, (label, per_site) in enumerate(results.items()):
        values = [per_site.get(c, {}).get(metric, float("nan")) for c in columns]
        ax.bar([j + i * width for j in range(len(columns))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns)
    ax.set_ylabel(f"test {metric}")
    ax.set_title("federated vs pooled vs local-only (equal compute)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
