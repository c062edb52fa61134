"""Accuracy of federation with real local work per round, on the 5-vendor phantom (each site its own scanner
vendor and EF mix), at equal compute (FLamby's rule: rounds x local steps x batch = pooled's samples).

    python bench/federated_accuracy.py --seeds 0,1,2 --threads 2

Per seed:
1. Pre-training (label-free): federated masked-autoencoder pre-training with one local epoch of AdamW per
   round (`PRETRAIN_RECIPES`: FedAvg, FedAvg with the local learning rate scaled to the sites averaged,
   DiLoCo), against pooled pre-training of as many epochs at the best of `POOLED_LRS`: validation MAE losses.
2. Fine-tuning recipes (`RECIPES`), each from the federated encoder with the lowest validation loss, one
   local epoch per round (at most 50 steps): test EF MAE over all sites' test videos, the validation EF MAE
   the recipe is chosen by, rounds, local steps per round, bytes per site (both phases, up and down), and a
   modelled deployment time. Pooled and local-only training (pre-training, then fine-tuning, at equal
   compute: `fedecho.sim.compare`) are the baselines; federated / pooled and local-only / pooled are ratios
   of test EF MAE.
3. Few labels: 10 % and 25 % of each site's labels, fine-tuned from step 1's encoder and from scratch, each
   arm with the recipe of `FEW_RECIPES` it does best with on validation.
A recipe is chosen on VAL (the mean over seeds of the federated validation EF MAE after the last round)
and reported on TEST. The modelled wall time of a deployment is the rounds times the measured fixed cost
per round (`bench/federation.py`, deployed, echo_vit_small) plus the bytes each site moves at 100 Mbit/s,
for echo_vit_tiny as run and for echo_vit_base by the bytes of its exchanged tensors. Results per seed
and recipe are cached beside their state, so an interrupted run continues where it stopped.
Writes bench/results/federated_accuracy.json.
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

from fedecho.client.local import site_datasets
from fedecho.client.policy import SMALL_PHANTOM_POLICY
from fedecho.fl.config import FedRunConfig, load_fed_run_config
from fedecho.fl.protocol import build_model
from fedecho.models import load_checkpoint
from fedecho.sim.compare import _trained, centralized, score
from fedecho.sim.run import SimSites, simulate, site_layout
from fedecho.storage import Store
from fedecho.storage.store import store_url
from fedecho.synth import synthesize
from fedecho.train import pretrain_loss

row = functools.partial(table_row, "Accuracy")

# Pre-training recipes: overrides of [pretrain] over the base run file (FedAvg, one local epoch of AdamW per
# round). The federation averages five sites' updates, as if each step saw five times the batch: the scaled
# local learning rate is that recipe. Fine-tuning starts from the one with the lowest validation loss.
PRETRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavg, 5x local lr": {"lr": 5e-3},
    "diloco": {"outer_lr": 0.7, "outer_momentum": 0.9, "keep_optimizer": True},
}
# Pooled pre-training's learning rate, chosen on the same validation loss: the federation's recipes are
# compared with pooled training at its best, not at the federation's learning rate.
POOLED_LRS = (1e-3, 3e-3, 5e-3)

# Fine-tuning recipes: overrides of [finetune] (and [strategy]) over the base run file. Every recipe does the
# same local work per round.
RECIPES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "scaffold": {"scaffold": True},
    "diloco": {"outer_lr": 0.7, "outer_momentum": 0.9, "keep_optimizer": True},
    "diloco + label shift": {
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        "keep_optimizer": True,
        "target_stats": True,
        "refit": "end",
    },
    "label shift": {"target_stats": True, "refit": "end"},
    "lora + label shift": {"lora_rank": 8, "target_stats": True, "refit": "end"},
}
# With few labels each arm (pre-trained, scratch) takes the one of these with the lower validation EF MAE.
FEW_RECIPES = ("label shift", "lora + label shift")
MBIT = 100e6 / 8  # bytes per second at 100 Mbit/s


def run_file(base: dict[str, Any], work: Path, name: str, seed: int, **edits: Any) -> Path:
    """A variant of the base run file (written where the ClientApps read it as text). edits: `finetune`,
    `pretrain` (dicts of keys), `label_fraction`, `init` (fine-tune only, from this checkpoint; "" scratch)."""
    raw = copy.deepcopy(base)
    raw["run"].update(name=name, seed=seed)
    raw["finetune"].update(edits.get("finetune", {}))
    raw["pretrain"].update(edits.get("pretrain", {}))
    if "label_fraction" in edits:
        raw.setdefault("data", {})["label_fraction"] = edits["label_fraction"]
    if "init" in edits:
        raw["pretrain"]["rounds"] = 0
        raw["finetune"]["init"] = edits["init"]
    if edits.get("finetune_rounds") == 0:
        raw["finetune"]["rounds"] = 0
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def sites_of(cfg: FedRunConfig, data: Path, state: Path) -> list[Any]:
    names, folders, partitioned = site_layout(data, None)
    resolver = SimSites(names, [f.resolve() for f in folders], partitioned, state / "cache", state)
    return [resolver.site(k) for k in range(len(names))]


def federate(path: Path, data: Path, state: Path, console: Console) -> tuple[FedRunConfig, int, float]:
    cfg = load_fed_run_config(path)
    t0 = time.time()
    run_id = simulate(cfg, data, state, default_policy=SMALL_PHANTOM_POLICY)
    console.print(f"{path.stem}: run {run_id} in {time.time() - t0:.0f} s")
    return cfg, run_id, time.time() - t0


def run_facts(state: Path, run_id: int, cfg: FedRunConfig) -> dict[str, Any]:
    """From the store: rounds and local steps per phase, bytes per site, the last validation metrics."""
    store = Store(store_url(state, None))
    results = store.site_results(run_id)
    sites = sorted({r.site for r in results})
    out: dict[str, Any] = {"rounds": {}, "steps_per_round": {}, "bytes_down": {}, "bytes_up": {}}
    for phase in cfg.phases:
        rows = [r for r in results if r.phase == phase]
        out["rounds"][phase] = cfg.phase(phase).rounds
        steps = [r.metrics.get("steps", 0.0) for r in rows if r.kind == "train" and r.status == "ok"]
        out["steps_per_round"][phase] = float(np.mean(steps)) if steps else 0.0
        out["bytes_down"][phase] = sum(r.bytes_down for r in rows) / max(len(sites), 1)
        out["bytes_up"][phase] = sum(r.bytes_up for r in rows) / max(len(sites), 1)
    last = store.rounds(run_id)[-1]
    out["val"] = {k: v for k, v in last.evaluate.items() if not k.endswith(".sites")}
    return out


def final_checkpoint(state: Path, run_id: int, phase: str) -> str:
    return next(c.path for c in Store(store_url(state, None)).checkpoints(run_id) if c.phase == phase)


def test_ef(cfg: FedRunConfig, data: Path, state: Path, run_id: int) -> dict[str, float]:
    model = load_checkpoint(final_checkpoint(state, run_id, "finetune"))
    return score(cfg, model, sites_of(cfg, data, state))["all sites"]


def val_pretrain_loss(cfg: FedRunConfig, model: Any, data: Path, state: Path) -> float:
    """Masked-reconstruction loss over every site's validation clips (fixed masks), videos weighted."""
    total = n = 0.0
    for site in sites_of(cfg, data, state):
        val = site_datasets(cfg, model, "pretrain", site, cfg.phase("pretrain").seed)["val_clips"]
        val.prepare(progress=False)
        if len(val):
            total += pretrain_loss(model, val, cfg.phase("pretrain").batch_size, 0) * len(val)
            n += len(val)
    return total / max(n, 1.0)


def cached(path: Path, key: dict[str, Any], compute: Any) -> Any:
    """compute() once per key: the result is kept at path (a seed's work takes the better part of an hour)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    result = compute()
    path.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def one_seed(base: dict[str, Any], args: argparse.Namespace, data: Path, seed: int, console: Console) -> dict[str, Any]:
    work = args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    state = work.resolve()
    key = {"base": base, "videos": args.videos, "sites": args.sites}
    res: dict[str, Any] = {"seed": seed, "pretrain": {}, "pooled_pretrain": {}}

    for name, overrides in PRETRAIN_RECIPES.items():

        def pretraining(name: str = name, overrides: dict[str, Any] = overrides) -> dict[str, Any]:
            path = run_file(base, work, f"pretrain-{slug_of(name)}-seed{seed}", seed, finetune_rounds=0,
                            pretrain=overrides)  # fmt: skip
            cfg, run_id, seconds = federate(path, data, state, console)
            encoder = final_checkpoint(state, run_id, "pretrain")
            loss = val_pretrain_loss(cfg, load_checkpoint(encoder), data, state)
            return {"encoder": encoder, "val_loss": loss, "seconds": seconds, **run_facts(state, run_id, cfg)}

        res["pretrain"][name] = cached(
            work / f"pretrain-{slug_of(name)}.json", {**key, "recipe": overrides}, pretraining
        )
    for lr in POOLED_LRS:

        def pooled_pretraining(lr: float = lr) -> dict[str, Any]:
            cfg = load_fed_run_config(run_file(base, work, f"pooled-pretrain-seed{seed}", seed, pretrain={"lr": lr}))
            torch.manual_seed(seed)
            pooled = centralized(cfg, "pretrain", sites_of(cfg, data, state), build_model(cfg, "pretrain"))
            return {"val_loss": val_pretrain_loss(cfg, pooled, data, state)}

        res["pooled_pretrain"][str(lr)] = cached(work / f"pooled-pretrain-{lr:g}.json", {**key, "lr": lr},
                                                 pooled_pretraining)["val_loss"]  # fmt: skip
    # Fine-tuning starts from the federated pre-training with the lowest validation loss on this seed.
    chosen = min(res["pretrain"], key=lambda n: res["pretrain"][n]["val_loss"])
    res["pretrain_chosen"] = chosen
    encoder = res["pretrain"][chosen]["encoder"]
    pooled_lr = min(POOLED_LRS, key=lambda lr: res["pooled_pretrain"][str(lr)])
    ft_key = {**key, "pretrain": PRETRAIN_RECIPES[chosen]}
    res["recipes"] = {}
    for name, overrides in RECIPES.items():
        if args.recipes and name not in args.recipes:
            continue

        def recipe(name: str = name, overrides: dict[str, Any] = overrides) -> dict[str, Any]:
            path = run_file(base, work, f"{slug_of(name)}-seed{seed}", seed, finetune=overrides, init=encoder)
            cfg, run_id, seconds = federate(path, data, state, console)
            return {"test": test_ef(cfg, data, state, run_id), "seconds": seconds, **run_facts(state, run_id, cfg)}

        res["recipes"][name] = cached(work / f"{slug_of(name)}.json", {**ft_key, "recipe": overrides}, recipe)

    def baselines() -> dict[str, Any]:
        # pooled and local-only pre-training at the learning rate pooled pre-training chose on validation
        path = run_file(base, work, f"baseline-seed{seed}", seed, pretrain={"lr": pooled_lr})
        cfg = load_fed_run_config(path)
        sites = sites_of(cfg, data, state)
        out = {"pooled": score(cfg, _trained(cfg, sites, None), sites)["all sites"]}
        for site in sites:
            console.print(f"training {site.name} alone at equal compute ...")
            out[f"local: {site.name}"] = score(cfg, _trained(cfg, [site], None), sites)["all sites"]
        return out

    res["baselines"] = cached(work / "baselines.json", {**key, "pretrain_lr": pooled_lr}, baselines)
    res["few"] = {}
    for fraction in (0.1, 0.25):
        for arm, init in (("pre-trained", encoder), ("scratch", "")):
            for name in FEW_RECIPES:
                slug = f"few{int(fraction * 100)}-{arm}-{slug_of(name)}"

                def few_run(
                    fraction: float = fraction, init: str = init, slug: str = slug, name: str = name
                ) -> dict[str, Any]:
                    path = run_file(base, work, f"{slug}-seed{seed}", seed, finetune=RECIPES[name], init=init,
                                    label_fraction=fraction)  # fmt: skip
                    cfg, run_id, _ = federate(path, data, state, console)
                    return {"test": test_ef(cfg, data, state, run_id), "val": run_facts(state, run_id, cfg)["val"]}

                few_key = {**(ft_key if init else key), "recipe": RECIPES[name], "fraction": fraction}
                res["few"][slug] = cached(work / f"{slug}.json", few_key, few_run)
    return res


def slug_of(name: str) -> str:
    return name.replace(" + ", "-").replace(", ", "-").replace(" ", "-")


def exchanged_bytes(model: str, phase: str, lora_rank: int = 0) -> int:
    """One direction of one round for a model, on the int8 wire the recipes use (exact count of the encoding)."""
    from fedecho.fl.exchange import encode, exchanged_keys
    from fedecho.models import create_model

    torch.manual_seed(0)
    m = create_model(model, decoder=phase == "pretrain", tasks=["ef"], stf_norm="group")
    if lora_rank and phase == "finetune":
        from fedecho.models.lora import LoraSpec, apply_lora

        m = apply_lora(m, LoraSpec(rank=lora_rank))
    state = m.state_dict()
    return encode({k: state[k] for k in exchanged_keys(m, phase)}, "int8").count_bytes()


def modelled_hours(facts: dict[str, Any], fixed: float, scale: dict[str, float]) -> float:
    """Rounds x fixed cost per round + each site's bytes (both directions) at 100 Mbit/s, hours."""
    seconds = 0.0
    for phase, rounds in facts["rounds"].items():
        moved = (facts["bytes_down"][phase] + facts["bytes_up"][phase]) * scale.get(phase, 1.0)
        seconds += rounds * fixed + moved / MBIT
    return seconds / 3600


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/bench_accuracy.toml"))
    p.add_argument("--videos", type=int, default=250, help="phantom videos over the sites")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2", help="run seeds (comma-separated); results are means")
    p.add_argument("--recipes", nargs="*", default=None, help="fine-tuning recipes to run (default: all)")
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
    per_seed = [one_seed(base, args, data, seed, console) for seed in seeds]

    fed = json.loads((Path("bench/results/federation.json")).read_text())
    fixed = next(r["value"] for r in fed["table"] if r["measure"].startswith("fixed cost per round"))
    tiny = base["model"]["name"]
    recipes = list(per_seed[0]["recipes"])
    pooled = float(np.mean([r["baselines"]["pooled"]["ef_mae"] for r in per_seed]))
    local = float(np.mean([np.mean([v["ef_mae"] for k, v in r["baselines"].items() if k.startswith("local")])
                           for r in per_seed]))  # fmt: skip
    summary: dict[str, Any] = {}
    for name in recipes:
        runs = [r["recipes"][name] for r in per_seed]
        lora = RECIPES[name].get("lora_rank", 0)
        scale = {ph: exchanged_bytes("echo_vit_base", ph, lora) / exchanged_bytes(tiny, ph, lora)
                 for ph in ("pretrain", "finetune")}  # fmt: skip
        pre = per_seed[0]["pretrain"][per_seed[0]["pretrain_chosen"]]
        facts = {k: {**pre[k], **runs[0][k]} for k in ("rounds", "bytes_down", "bytes_up")}
        summary[name] = {
            "val_ef_mae": float(np.mean([r["val"].get("val_ef_mae", np.nan) for r in runs])),
            "test_ef_mae": float(np.mean([r["test"]["ef_mae"] for r in runs])),
            "test_ef_r2": float(np.mean([r["test"]["ef_r2"] for r in runs])),
            "rounds": facts["rounds"],
            "steps_per_round": {**pre["steps_per_round"], **runs[0]["steps_per_round"]},
            "bytes_per_site": {d: sum(facts[d].values()) for d in ("bytes_down", "bytes_up")},
            "hours_tiny": modelled_hours(facts, fixed, {}),
            "hours_base": modelled_hours(facts, fixed, scale),
        }
    chosen = min(summary, key=lambda n: summary[n]["val_ef_mae"])
    # pre-training: each recipe's validation MAE loss over pooled pre-training's at its best learning rate
    pre_ratio = {name: float(np.mean([r["pretrain"][name]["val_loss"] / min(r["pooled_pretrain"].values())
                                      for r in per_seed]))
                 for name in PRETRAIN_RECIPES}  # fmt: skip
    table = [
        row(f"pre-training val MAE loss, federated ({name}, 1 local epoch) / pooled", round(ratio, 3), "x")
        for name, ratio in pre_ratio.items()
    ]
    table += [
        row("test EF MAE, pooled (all sites' data in one place)", round(pooled, 2), "EF"),
        row("local-only / pooled test EF MAE (mean over sites)", round(local / pooled, 3), "x"),
    ]  # fmt: skip
    for name, s in summary.items():
        ratio = s["test_ef_mae"] / pooled
        rounds = max(s["rounds"].values())
        label = f"federated / pooled test EF MAE, {name}{' (chosen on val)' if name == chosen else ''}"
        met = ratio <= 1.10 and rounds <= 40
        table.append(row(label, round(ratio, 3), "x", "<= 1.10x, <= 40 rounds/phase", met))
    few: dict[str, Any] = {}
    for pct in (10, 25):
        for arm in ("pre-trained", "scratch"):
            runs = {n: [r["few"][f"few{pct}-{arm}-{slug_of(n)}"] for r in per_seed] for n in FEW_RECIPES}
            pick = min(runs, key=lambda n: np.mean([x["val"].get("val_ef_mae", np.nan) for x in runs[n]]))
            few[f"{pct}% {arm}"] = {
                "recipe": pick,
                "test_ef_mae": float(np.mean([x["test"]["ef_mae"] for x in runs[pick]])),
            }
        pre, scratch = few[f"{pct}% pre-trained"], few[f"{pct}% scratch"]
        ratio = pre["test_ef_mae"] / scratch["test_ef_mae"]
        target = ("<= 0.8x", ratio <= 0.8) if pct == 10 else (None, None)
        table.append(row(f"pre-trained ({pre['recipe']}) / scratch ({scratch['recipe']}) test EF MAE, {pct} % labels",
                         round(ratio, 3), "x", *target))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"videos": args.videos, "sites": args.sites, "seeds": seeds, "config": str(args.config),
           "fixed_cost_s_per_round": fixed, "pretrain_recipes": PRETRAIN_RECIPES, "pooled_lrs": POOLED_LRS,
           "pretrain_ratio": pre_ratio, "recipes": RECIPES, "chosen": chosen, "summary": summary, "few": few,
           "per_seed": per_seed, "table": table}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{args.sites} sites (natural vendor split), {args.videos} phantom videos, seeds {args.seeds}\n")
    print(
        "| recipe | rounds (pre/fine) | steps/round | MB/site down+up | val EF MAE | test EF MAE | fed/pooled "
        "| deployed h (tiny / base) |\n|---|---|---|---|---|---|---|---|"
    )
    for name, s in summary.items():
        mb = sum(s["bytes_per_site"].values()) / 1e6
        rounds = f"{s['rounds'].get('pretrain', 0)}/{s['rounds']['finetune']}"
        hours = f"{s['hours_tiny']:.2f} / {s['hours_base']:.2f}"
        print(
            f"| {name}{' *' if name == chosen else ''} | {rounds} | {s['steps_per_round'].get('finetune', 0):.0f} "
            f"| {mb:.1f} | {s['val_ef_mae']:.2f} | {s['test_ef_mae']:.2f} | {s['test_ef_mae'] / pooled:.2f}x "
            f"| {hours} |"
        )
    print("\n| pre-training recipe | val MAE loss (mean over seeds) | / pooled at its best lr |\n|---|---|---|")
    for name, ratio in pre_ratio.items():
        loss = np.mean([r["pretrain"][name]["val_loss"] for r in per_seed])
        print(f"| {name} | {loss:.4f} | {ratio:.3f}x |")
    print("\n| measure | value | target |\n|---|---|---|")
    for r in table:
        print(f"| {r['measure']} | {r['value']}{r['unit'] if r['unit'] == 'x' else ''} | {r['target'] or ''} |")


if __name__ == "__main__":
    main()
