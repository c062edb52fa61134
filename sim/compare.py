"""`fedecho sim --compare`: federated against pooled and local-only training at equal compute.

The FLamby protocol: with R rounds of E local epochs, every site's data is seen R x E times in the
federation; pooled training (all sites' training videos in one place, which hospitals cannot do)
and local-only training (each site alone) get the same R x E epochs, with the same recipe
(optimiser, learning rate, warm-up of R_w x E epochs, then cosine). Every model is scored on every
site's test split; "all sites" weighs each site by its test videos. Beside them the mean predictor (every
test video gets the pooled training mean), the floor any model must clear. A table and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import ConcatDataset, DataLoader

from fedecho.client.local import site_datasets
from fedecho.client.site import Site
from fedecho.data import EchoVideoDataset
from fedecho.fl.config import FedPhaseSection, FedRunConfig, round_seed
from fedecho.fl.protocol import build_model
from fedecho.fl.strategies import server_optimizer_params
from fedecho.models import EchoVisionFM, load_checkpoint
from fedecho.models.lora import to_lora_state
from fedecho.sim.run import SimSites, site_layout
from fedecho.storage import Store
from fedecho.storage.files import atomic_write_bytes
from fedecho.storage.store import store_url
from fedecho.train import Trainer, pick_device
from fedecho.train.engine import predict_dataset, prediction_metrics


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


def mean_predictor(cfg: FedRunConfig, sites: list[Site]) -> dict[str, dict[str, float]]:
    """Every regression target predicted as its mean over all sites' training videos (the labels only, from the
    data index: nothing decoded), scored like a model on each site's test split and over all sites."""
    from fedecho.models import get_task
    from fedecho.train.metrics import reduced_ef_auroc, regression

    model = build_model(cfg, "finetune")
    pcfg = cfg.phase("finetune")
    tasks = [t for t in pcfg.tasks if get_task(t).kind == "regression"]
    splits = [site_datasets(cfg, model, "finetune", s, pcfg.seed) for s in sites]
    train = [r for sp in splits for r in sp["train"].records]
    means = {t: float(np.mean([r.targets[t] for r in train if t in r.targets])) for t in tasks}
    out: dict[str, dict[str, float]] = {}
    every: dict[str, list[float]] = {t: [] for t in tasks}
    for site, sp in zip(sites, splits, strict=True):
        test = sp["test"].records
        if not test:
            continue
        out[site.name] = {"videos": float(len(test))}
        for t in tasks:
            y = np.array([r.targets[t] for r in test if t in r.targets])
            every[t].extend(y)
            out[site.name].update({f"{t}_{k}": v for k, v in regression(y, np.full_like(y, means[t])).items()})
    total = {"videos": float(sum(len(sp["test"].records) for sp in splits))}
    for t in tasks:
        y = np.array(every[t])
        total.update({f"{t}_{k}": v for k, v in regression(y, np.full_like(y, means[t])).items()})
        if t == "ef":
            total["ef_lt50_auroc"] = reduced_ef_auroc(y, np.full_like(y, means[t]))
    out["all sites"] = total
    return out


def score(cfg: FedRunConfig, model: EchoVisionFM, sites: list[Site]) -> dict[str, dict[str, float]]:
    """Metrics on each site's test split, and over all sites' test videos pooled (R2 and AUROC of the pooled
    predictions, not a mean of each site's: under label shift a site's own spread is narrow)."""
    tasks = list(cfg.phase("finetune").tasks)
    out: dict[str, dict[str, float]] = {}
    ys: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    preds: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    for site in sites:
        test = site_datasets(cfg, model, "finetune", site, cfg.phase("finetune").seed)["test"]
        test.prepare(progress=False)
        if not len(test):
            continue
        y, p = predict_dataset(model, test, tasks)
        out[site.name] = prediction_metrics(y, p)
        for t in tasks:
            ys[t].append(y[t])
            preds[t].append(p[t])
    if any(ys.values()):
        pooled = {t: np.concatenate(ys[t]) for t in tasks}, {t: np.concatenate(preds[t]) for t in tasks}
        out["all sites"] = prediction_metrics(*pooled)
    else:
        out["all sites"] = {}
    return out


def _trained(cfg: FedRunConfig, sites: list[Site], batch_size: int | None) -> EchoVisionFM:
    """Pre-train (when the run does), then fine-tune, on these sites' pooled data."""
    encoder = None
    if cfg.phase("pretrain").rounds:
        encoder = centralized(cfg, "pretrain", sites, build_model(cfg, "pretrain"), batch_size)
    torch.manual_seed(round_seed(cfg.run.seed, "finetune", 0))
    model = build_model(cfg, "finetune")
    if encoder is not None:
        pretrained = {k: v for k, v in encoder.state_dict().items() if k.startswith("encoder.")}
        model.load_state_dict(to_lora_state(pretrained, model), strict=False)  # LoRA: under the wrapped names
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
    results["mean predictor"] = mean_predictor(cfg, site_list)
    out = state / f"compare-run-{run_id:04d}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "compare.json", json.dumps(results, indent=2).encode())
    metric = _headline(cfg)
    _summary(results, console)
    _table(results, names, metric, console)
    _plot(results, [*names, "all sites"], metric, out / "compare.png")
    console.print(f"written: {out / 'compare.json'}, {out / 'compare.png'}")
    return results


def _headline(cfg: FedRunConfig) -> str:
    task = cfg.phase("finetune").tasks[0]
    return f"{task}_mae" if task in ("ef", "esv", "edv") else f"{task}_auroc"


SUMMARY = (("ef_mae", "EF MAE", "{:.2f}"), ("ef_r2", "EF R2", "{:.3f}"), ("ef_lt50_auroc", "EF<50% AUROC", "{:.3f}"),
           ("ef_class_auroc", "EF-class head AUROC", "{:.3f}"))  # fmt: skip


def _summary(results: dict[str, Any], console: Console) -> None:
    """Test metrics over all sites' test videos, one row per training set: what `make demo` ends with."""
    shown = [m for m in SUMMARY if any(m[0] in r.get("all sites", {}) for r in results.values())]
    table = Table(title="test metrics over all sites' test videos (equal compute)")
    table.add_column("trained on")
    for _, label, _ in shown:
        table.add_column(label, justify="right")
    for name, per_site in results.items():
        every = per_site.get("all sites", {})
        cells = [fmt.format(every[key]) if key in every else "-" for key, _, fmt in shown]
        table.add_row(name, *cells)
    console.print(table)


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
