"""Accuracy of federation on the phantom (issue 6 item 6): 5 sites split naturally by scanner vendor,
equal compute (the FLamby protocol of `fedecho sim --compare`).

    python bench/federated_accuracy.py --videos 250 --seeds 0,1 --threads 2

1. Federated pre-training + EF fine-tuning (the strategy of --config), then pooled and local-only training at equal
   compute (`fedecho.sim.compare`: as many videos as the federation's sites see, at --baseline-batch): test EF
   MAE over all sites' test videos, federated / pooled and each local-only model / pooled (target: federated at
   most 1.10x pooled).
2. Few labels: the same federated fine-tuning with --fraction of each site's labels, from step 1's federated
   pre-training, against the same fine-tuning from scratch: the ratio of their test EF MAE (target at most 0.8).
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

from fedecho.client.policy import SMALL_PHANTOM_POLICY
from fedecho.fl.config import load_fed_run_config
from fedecho.models import load_checkpoint
from fedecho.sim.compare import compare_runs, score
from fedecho.sim.run import SimSites, simulate, site_layout
from fedecho.storage import Store
from fedecho.storage.store import store_url
from fedecho.synth import synthesize

row = functools.partial(table_row, "6. Accuracy")


def run_file(
    base: dict[str, Any], work: Path, name: str, seed: int, fraction: float, init: str | None, batch: int = 0
) -> Path:
    """A variant of the base run file, written where the ClientApps can read it as text. `init`: ""
    to pre-train as the base does, else fine-tuning only, from this checkpoint (None: from scratch).
    `batch`: fine-tune at this batch per site instead, in proportionally fewer rounds (same videos)."""
    raw = copy.deepcopy(base)
    raw["run"].update(name=name, seed=seed)
    raw.setdefault("data", {})["label_fraction"] = fraction
    if init != "":
        raw["pretrain"]["rounds"] = 0
        raw["finetune"]["init"] = init or ""
    ft = raw["finetune"]
    if batch and batch != ft["batch_size"]:
        scale = ft["batch_size"] / batch
        ft.update(batch_size=batch, rounds=max(1, round(ft["rounds"] * scale)))
        ft["warmup_rounds"] = round(ft.get("warmup_rounds", 0) * scale)
        ft["eval_every"] = max(1, round(ft.get("eval_every", 1) * scale))
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def federate(cfg_path: Path, data: Path, state: Path, console: Console) -> tuple[int, float]:
    """One simulated federation; returns (run id, seconds)."""
    cfg = load_fed_run_config(cfg_path)
    t0 = time.time()
    run_id = simulate(cfg, data, state, default_policy=SMALL_PHANTOM_POLICY)
    console.print(f"{cfg_path.stem}: run {run_id} in {time.time() - t0:.0f} s")
    return run_id, time.time() - t0


def final_checkpoint(state: Path, run_id: int, phase: str) -> str:
    return next(c.path for c in Store(store_url(state, None)).checkpoints(run_id) if c.phase == phase)


def final_score(cfg_path: Path, data: Path, state: Path, run_id: int) -> float:
    """All-sites test EF MAE of a run's final fine-tuned model."""
    cfg = load_fed_run_config(cfg_path)
    names, folders, partitioned = site_layout(data, None)
    resolver = SimSites(names, [f.resolve() for f in folders], partitioned, state / "cache", state)
    sites = [resolver.site(k) for k in range(len(names))]
    model = load_checkpoint(final_checkpoint(state, run_id, "finetune"))
    return float(score(cfg, model, sites)["all sites"]["ef_mae"])


def one_seed(base: dict[str, Any], args: argparse.Namespace, data: Path, seed: int, console: Console) -> dict[str, Any]:
    """Federated, pooled and local-only with all labels, then the two few-label arms."""
    res: dict[str, Any] = {"seed": seed}
    state = (args.work / f"state-seed{seed}").resolve()
    full = run_file(base, args.work, f"full-seed{seed}", seed, 1.0, init="")
    run_id, res["federated_seconds"] = federate(full, data, state, console)
    cfg = load_fed_run_config(full)
    cmp = compare_runs(cfg, data, state, run_id, console=console, batch_size=args.baseline_batch)
    res["federated"] = cmp["federated"]["all sites"]["ef_mae"]
    res["pooled"] = cmp["pooled"]["all sites"]["ef_mae"]
    local = {k.removeprefix("local: "): v for k, v in cmp.items() if k.startswith("local")}
    res["local"] = {k: v["all sites"]["ef_mae"] for k, v in local.items()}
    # Both few-label arms fine-tune only: from the full run's federated pre-training, or from scratch.
    encoder = final_checkpoint(state, run_id, "pretrain")
    for arm, init in (("pre-trained", encoder), ("scratch", None)):
        cfg_path = run_file(base, args.work, f"few-{arm}-seed{seed}", seed, args.fraction, init, args.few_batch)
        run_id, _ = federate(cfg_path, data, state, console)
        res[f"few_{arm}"] = final_score(cfg_path, data, state, run_id)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/bench_accuracy.toml"))
    p.add_argument("--videos", type=int, default=250, help="phantom videos over the 5 sites")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.1, help="label fraction of the few-label arms")
    p.add_argument("--seeds", default="0", help="run seeds (comma-separated); results are means")
    p.add_argument("--baseline-batch", type=int, default=8, help="batch of the pooled and local-only baselines")
    p.add_argument(
        "--few-batch", type=int, default=0,
        help="fine-tuning batch per site of the few-label arms, same videos in fewer rounds (0: the config's)",
    )  # fmt: skip
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
        # A seed's result is kept beside its state, keyed by everything that decides it, so an
        # interrupted multi-seed run (each seed takes about half an hour) resumes at the next seed.
        key = {"config": args.config.read_text(), "videos": args.videos, "sites": args.sites,
               "fraction": args.fraction, "baseline_batch": args.baseline_batch,
               "few_batch": args.few_batch}  # fmt: skip
        cache = args.work / f"result-seed{seed}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") == key:
            console.print(f"seed {seed}: the result in {cache}")
            res = cached["result"]
        else:
            res = one_seed(base, args, data, seed, console)
            cache.write_text(json.dumps({"key": key, "result": res}, indent=2) + "\n")
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
               "baseline_batch": args.baseline_batch, "few_batch": args.few_batch, "config": str(args.config),
               "per_seed": per_seed, "mean": mean, "table": table}  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{args.sites} sites (natural vendor split), {args.videos} phantom videos, seeds {args.seeds}\n")
    print("| measure | value | target |\n|---|---|---|")
    for r in table:
        print(f"| {r['measure']} | {r['value']}{r['unit'] if r['unit'] == 'x' else ''} | {r['target'] or ''} |")


if __name__ == "__main__":
    main()
