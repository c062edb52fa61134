"""Accuracy of federation on the phantom (issue 6 item 6): 5 sites split naturally by scanner vendor,
equal compute (the FLamby protocol of `fedecho sim --compare`).

    python bench/federated_accuracy.py --videos 250 --seeds 0 --threads 2

1. Federated pre-training + EF fine-tuning (the strategy of --config), then pooled and local-only training at equal
   compute (`fedecho.sim.compare`): test EF MAE over all sites' test videos, federated / pooled and
   each local-only model / pooled (target: federated at most 1.10x pooled).
2. Few labels: the same federation fine-tuned with --fraction of each site's labels, after the
   federated pre-training, against the same fine-tuning from scratch (no pre-training): the ratio of
   their test EF MAE (target at most 0.8).
Fine-tuning runs a fixed number of local steps per round (`steps`), so every arm, with all labels
or few, does the same number of updates. Writes bench/results/federated_accuracy.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tomli_w
import torch
from _table import table_row
from rich.console import Console

from fedecho.fl.config import load_fed_run_config
from fedecho.models import load_checkpoint
from fedecho.sim.compare import compare_runs, score
from fedecho.sim.run import SimSites, simulate, site_layout
from fedecho.storage import Store
from fedecho.storage.store import store_url
from fedecho.synth import synthesize

row = functools.partial(table_row, "6. Accuracy")


def run_file(base: dict[str, Any], work: Path, name: str, seed: int, fraction: float, pretrain: bool) -> Path:
    """A variant of the base run file, written where the ClientApps can read it as text."""
    raw = copy.deepcopy(base)
    raw["run"].update(name=name, seed=seed)
    raw.setdefault("data", {})["label_fraction"] = fraction
    if not pretrain:
        raw["pretrain"]["rounds"] = 0
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def federate(cfg_path: Path, data: Path, state: Path, console: Console) -> tuple[int, float]:
    """One simulated federation; returns (run id, seconds)."""
    cfg = load_fed_run_config(cfg_path)
    t0 = time.time()
    run_id = simulate(cfg, data, state)
    console.print(f"{cfg_path.stem}: run {run_id} in {time.time() - t0:.0f} s")
    return run_id, time.time() - t0


def final_score(cfg_path: Path, data: Path, state: Path, run_id: int) -> float:
    """All-sites test EF MAE of a run's final fine-tuned model."""
    cfg = load_fed_run_config(cfg_path)
    names, folders, partitioned = site_layout(data, None)
    resolver = SimSites(names, [f.resolve() for f in folders], partitioned, state / "cache", state)
    final = next(c for c in Store(store_url(state, None)).checkpoints(run_id) if c.phase == "finetune")
    sites = [resolver.site(k) for k in range(len(names))]
    return float(score(cfg, load_checkpoint(final.path), sites)["all sites"]["ef_mae"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/bench_accuracy.toml"))
    p.add_argument("--videos", type=int, default=250, help="phantom videos over the 5 sites")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.1, help="label fraction of the few-label arms")
    p.add_argument("--seeds", default="0", help="run seeds (comma-separated); results are means")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("bench/work/federated_accuracy"))
    p.add_argument("--out", type=Path, default=Path("bench/results/federated_accuracy.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console()
    args.work.mkdir(parents=True, exist_ok=True)
    data = (args.work / f"phantom-{args.sites}x{args.videos}").resolve()
    if not (data / "phantom.json").is_file():
        synthesize(data, videos=args.videos, sites=args.sites, fmt="echonet", seed=0, progress=False)
    base = tomllib.loads(args.config.read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        res: dict[str, Any] = {"seed": seed}
        state = (args.work / f"state-seed{seed}").resolve()
        full = run_file(base, args.work, f"full-seed{seed}", seed, 1.0, pretrain=True)
        run_id, res["federated_seconds"] = federate(full, data, state, console)
        cmp = compare_runs(load_fed_run_config(full), data, state, run_id, console=console)
        res["federated"] = cmp["federated"]["all sites"]["ef_mae"]
        res["pooled"] = cmp["pooled"]["all sites"]["ef_mae"]
        res["local"] = {
            k.removeprefix("local: "): v["all sites"]["ef_mae"] for k, v in cmp.items() if k.startswith("local")
        }
        for arm, pretrain in (("pre-trained", True), ("scratch", False)):
            cfg_path = run_file(base, args.work, f"few-{arm}-seed{seed}", seed, args.fraction, pretrain)
            run_id, _ = federate(cfg_path, data, state, console)
            res[f"few_{arm}"] = final_score(cfg_path, data, state, run_id)
        per_seed.append(res)
        console.print(res)
    mean = {
        k: float(np.mean([r[k] for r in per_seed])) for k in ("federated", "pooled", "few_pre-trained", "few_scratch")
    }
    local_ratio = float(np.mean([np.mean(list(r["local"].values())) / r["pooled"] for r in per_seed]))
    fed_ratio = mean["federated"] / mean["pooled"]
    few_ratio = mean["few_pre-trained"] / mean["few_scratch"]
    pct = f"{args.fraction:.0%}"
    table = [
        row("test EF MAE, pooled (all sites' data in one place)", round(mean["pooled"], 2), "EF"),
        row(f"test EF MAE, federated ({base['strategy']['name']})", round(mean["federated"], 2), "EF"),
        row("federated / pooled test EF MAE", round(fed_ratio, 3), "x", "<= 1.10x", fed_ratio <= 1.10),
        row("local-only / pooled test EF MAE (mean over sites)", round(local_ratio, 3), "x"),
        row(f"test EF MAE, {pct} labels, federated pre-training", round(mean["few_pre-trained"], 2), "EF"),
        row(f"test EF MAE, {pct} labels, from scratch", round(mean["few_scratch"], 2), "EF"),
        row(f"pre-trained / scratch test EF MAE, {pct} labels", round(few_ratio, 3), "x", "<= 0.8x", few_ratio <= 0.8),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"videos": args.videos, "sites": args.sites, "seeds": seeds, "fraction": args.fraction,
               "config": str(args.config), "per_seed": per_seed, "mean": mean, "table": table}  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{args.sites} sites (natural vendor split), {args.videos} phantom videos, seeds {args.seeds}\n")
    print("| measure | value | target |\n|---|---|---|")
    for r in table:
        print(f"| {r['measure']} | {r['value']}{r['unit'] if r['unit'] == 'x' else ''} | {r['target'] or ''} |")


if __name__ == "__main__":
    main()
