"""Federation cost: overhead of real Flower processes over loopback, bytes per site per
round against the fp32 full model, and the accuracy cost of the byte savings.

    python bench/federation.py [--steps 16] [--rounds 3] [--wire int8] [--device cpu] [--skip-accuracy]

1. Overhead. A SuperLink and two SuperNodes (TLS, node authentication, the site's own ClientApp runner:
   `fedecho.sim.loopback`, the deployment tests' harness) run echo_vit_small with STF-Net: R pre-training
   rounds, then R frozen-encoder fine-tuning rounds, `--steps` local batches per round, `--wire`
   precision (int8 by default).
   Everything is read back from the run store: a round's wall time is from its start to the next
   round's start (aggregation, store writes and the checkpoint included); the last round of each
   phase also runs the federated evaluation and is left out. Overhead = (wall - the slowest site's
   local compute) / wall, where local compute is the `seconds` a site reports (model build, data,
   training, update). The target: at most 10 %.
2. Bytes. The bytes down and up the server recorded per site per round, against what the fp32 full
   model (every tensor of the phase's model: encoder + decoder in pre-training; encoder + STF-Net +
   heads in fine-tuning) would cost on the wire, counted the same way (Flower's count_bytes).
   Targets: at most 0.5x in pre-training, at most 0.1x in frozen-encoder fine-tuning. Other
   configurations, the int8 wire (int8 values + one float32 scale per output row) among them, are
   counted from the encoded tensors (no run needed: the count is exact; both directions encode the
   same tensors, so down and up are equal).
3. Accuracy cost. echo_vit_tiny in the simulation engine, same phantom, seeds and rounds: fp32 vs
   fp16 and int8 wire (pre-training validation loss, fine-tuning EF MAE), full vs frozen-encoder
   fine-tuning, and the frozen encoder with the max-pool head.

Writes bench/results/federation.json (with the aggregated "table").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _table import table_row

RUN_TOML = """
[run]
name = "{name}"
seed = {seed}
wire_dtype = "{wire}"
round_timeout = 1800

[model]
name = "{model}"
fusion = "{fusion}"

[data]
max_test_clips = 1

[pretrain]
rounds = {pre_rounds}
{pre_size}
batch_size = {batch}
lr = 1e-3
betas = [0.9, 0.95]
eval_every = 0

[finetune]
rounds = {ft_rounds}
{ft_size}
batch_size = {batch}
lr = 1e-3
weight_decay = 1e-4
tasks = ["ef"]
freeze_encoder = {freeze}
eval_every = 0
"""


def run_toml(
    name: str,
    model: str,
    *,
    wire: str,
    freeze: bool,
    fusion: str = "stf",
    rounds: tuple[int, int] = (3, 3),
    steps: int = 0,
    epochs: int = 1,
    batch: int = 2,
    seed: int = 0,
) -> str:
    """A federated run file; `steps` > 0 sets local batches per round, else `epochs` local epochs."""
    size = f"steps = {steps}" if steps else f"epochs = {epochs}"
    return RUN_TOML.format(
        name=name, seed=seed, wire=wire, model=model, fusion=fusion, pre_rounds=rounds[0], ft_rounds=rounds[1],
        pre_size=size, ft_size=size, batch=batch, freeze=str(freeze).lower(),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ bytes on the wire
def wire_bytes(model_name: str, phase: str, *, wire: str, freeze: bool = False, fusion: str = "stf") -> int:
    """Bytes of one direction of a round for this configuration, counted as the server counts them."""
    import torch

    from fedecho.fl.exchange import encode, exchanged_keys
    from fedecho.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, decoder=phase == "pretrain", fusion=fusion, tasks=["ef"])
    state = model.state_dict()
    return encode({k: state[k] for k in exchanged_keys(model, phase, freeze)}, wire).count_bytes()


def full_fp32_bytes(model_name: str, phase: str, fusion: str = "stf") -> int:
    """The reference: every float tensor of the phase's model in fp32 (what sending the whole model costs)."""
    return wire_bytes(model_name, phase, wire="float32", freeze=False, fusion=fusion)


def byte_configurations(model_name: str) -> list[dict[str, Any]]:
    """Per-direction bytes of a round for the configurations that matter, against the fp32 full model."""
    out = []
    for phase, freeze, fusion, wire in [
        ("pretrain", False, "stf", "float32"),
        ("pretrain", False, "stf", "float16"),
        ("finetune", False, "stf", "float16"),
        ("finetune", True, "stf", "float32"),
        ("finetune", True, "stf", "float16"),
        ("finetune", True, "max", "float16"),
        ("pretrain", False, "stf", "int8"),
        ("finetune", True, "stf", "int8"),
    ]:
        b = wire_bytes(model_name, phase, wire=wire, freeze=freeze, fusion=fusion)
        ref = full_fp32_bytes(model_name, phase, "stf")
        out.append({"phase": phase, "freeze_encoder": freeze, "fusion": fusion, "wire": wire, "bytes": b,
                    "full_fp32_bytes": ref, "ratio": b / ref})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- deployed overhead
def deployed_run(root: Path, data: Path, text: str, device: str, log: Path) -> tuple[int, float]:
    """Start a SuperLink and two SuperNodes on loopback, run the run file to its end; (run id, seconds)."""
    from fedecho.server.submit import submit_run
    from fedecho.sim.loopback import make_deployment

    dep = make_deployment(root, round_timeout=1800.0, min_sites=2)
    try:
        for name in ("site01", "site02"):
            dep.add_site(name, data / name, device=device)
        dep.start_all()
        toml = root / "run.toml"
        toml.write_text(text)
        t0 = time.time()
        with open(log, "w") as out:
            sub = submit_run(dep.server, toml, echo=lambda line: print(line, file=out, flush=True))
        seconds = time.time() - t0
        if sub.returncode != 0:
            raise RuntimeError(f"the deployed run failed ({sub.status}); see {log}")
    finally:
        dep.close()
    from fedecho.storage import Store
    from fedecho.storage.store import store_url

    with Store(store_url(dep.server.state)) as store:
        run_id = store.list_runs()[-1].id
    return run_id, seconds


def round_costs(state: Path, run_id: int) -> list[dict[str, Any]]:
    """Per round: wall time (start to next start), slowest site's compute, overhead, bytes per site."""
    from fedecho.storage import Store
    from fedecho.storage.store import store_url

    with Store(store_url(state)) as store:
        rounds = store.rounds(run_id)
        results = [r for r in store.site_results(run_id) if r.kind == "train"]
    out = []
    for phase in dict.fromkeys(r.phase for r in rounds):
        mine = sorted((r for r in rounds if r.phase == phase), key=lambda r: r.round)
        for r, nxt in zip(mine, [*mine[1:], None], strict=True):
            sites = [s for s in results if s.phase == phase and s.round == r.round]
            compute = max(float(s.metrics.get("seconds", 0.0)) for s in sites)
            row: dict[str, Any] = {
                "phase": phase,
                "round": r.round,
                "sites": len(sites),
                "slowest_site_s": compute,
                "bytes_down_per_site": statistics.mean(s.bytes_down for s in sites),
                "bytes_up_per_site": statistics.mean(s.bytes_up for s in sites),
                "measured": nxt is not None,  # the last round also evaluates: no clean wall time
            }
            if nxt is not None:
                wall = nxt.started - r.started
                row.update(wall_s=wall, overhead_s=wall - compute, overhead=(wall - compute) / wall)
            out.append(row)
    return out


# -------------------------------------------------------------------------------------- accuracy in simulation
def simulated_arm(data: Path, state: Path, text: str) -> dict[str, float]:
    """One simulation to its end: pre-training val loss and fine-tuning EF MAE after the last round."""
    from fedecho.client.policy import SMALL_PHANTOM_POLICY
    from fedecho.fl.config import parse_run_config
    from fedecho.sim.run import simulate
    from fedecho.storage import Store
    from fedecho.storage.store import store_url

    t0 = time.time()
    run_id = simulate(parse_run_config(text), data, state, default_policy=SMALL_PHANTOM_POLICY)
    with Store(store_url(state)) as store:
        last = {r.phase: r for r in store.rounds(run_id)}
    return {
        "pretrain_val_loss": float(last["pretrain"].evaluate.get("val_loss", float("nan"))),
        "finetune_val_ef_mae": float(last["finetune"].evaluate.get("val_ef_mae", float("nan"))),
        "seconds": time.time() - t0,
    }


ARMS = [  # (name, wire, freeze_encoder, fusion)
    ("fp32 wire, full fine-tuning", "float32", False, "stf"),
    ("fp16 wire, full fine-tuning", "float16", False, "stf"),
    ("fp16 wire, frozen encoder (STF-Net)", "float16", True, "stf"),
    ("fp16 wire, frozen encoder (max-pool head)", "float16", True, "max"),
    ("int8 wire, full fine-tuning", "int8", False, "stf"),
    ("int8 wire, frozen encoder (STF-Net)", "int8", True, "stf"),
]


# ---------------------------------------------------------------------------------------------------- report
row = functools.partial(table_row, "Federation")


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows `make bench` aggregates."""
    dep = result["deployment"]
    ov, pre, ft = dep["overhead_mean"], dep["bytes_ratio_pretrain"], dep["bytes_ratio_finetune_frozen"]
    best = next(c for c in result["byte_configurations"] if c["freeze_encoder"] and c["fusion"] == "max")
    int8 = {c["phase"]: c["ratio"] for c in result["byte_configurations"] if c["wire"] == "int8"}
    rows = [
        row(f"overhead, {dep['model']}, {dep['steps']} local steps/round of batch {dep['batch']}",
            round(100 * ov, 1), "%", "<= 10 %", ov <= 0.1),
        row("fixed cost per round (wall - slowest site)", round(dep["overhead_s_mean"], 2), "s/round"),
        row(f"bytes/site/round vs fp32 model, pre-training, {dep['wire']}", round(pre, 3), "x", "<= 0.5x", pre <= 0.5),
        row(f"bytes/site/round vs fp32 model, frozen encoder + STF-Net, {dep['wire']}", round(ft, 3), "x", "<= 0.1x",
            ft <= 0.1),
        row("bytes/site/round vs fp32 model, frozen encoder + max-pool head, float16", round(best["ratio"], 5), "x",
            "<= 0.1x", best["ratio"] <= 0.1),
    ]  # fmt: skip
    if dep["wire"] != "int8":  # the deployed run measured another wire: int8's exact counts
        rows += [
            row("bytes/site/round vs fp32 model, pre-training, int8 (counted)", round(int8["pretrain"], 3), "x",
                "<= 0.5x", int8["pretrain"] <= 0.5),
            row("bytes/site/round vs fp32 model, frozen encoder + STF-Net, int8 (counted)",
                round(int8["finetune"], 3), "x", "<= 0.1x", int8["finetune"] <= 0.1),
        ]  # fmt: skip
    acc = result.get("accuracy")
    if acc:
        ref = acc["arms"][0]
        for arm in acc["arms"][1:]:
            cost = arm["finetune_val_ef_mae"] - ref["finetune_val_ef_mae"]
            rows.append(row(f"EF MAE change, {arm['arm']} vs fp32 full ({acc['model']})", round(cost, 2), "EF points"))
        for arm in acc["arms"][1:]:
            if not arm["freeze_encoder"] and arm["wire"] != "float32":
                cost = arm["pretrain_val_loss"] - ref["pretrain_val_loss"]
                rows.append(row(f"pre-training val loss change, {arm['wire']} vs fp32 wire ({acc['model']})",
                                round(cost, 4), "loss"))  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="echo_vit_small", help="model of the deployed run")
    p.add_argument("--steps", type=int, default=16, help="local batches per round in the deployed run")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="rounds per phase (the last one of each is not timed)")
    p.add_argument("--videos", type=int, default=24, help="phantom videos over the two sites")
    p.add_argument("--device", default="cpu", help="the sites' device: cpu or cuda (bf16 autocast)")
    p.add_argument("--accuracy-model", default="echo_vit_tiny")
    p.add_argument("--accuracy-videos", type=int, default=40)
    p.add_argument("--accuracy-rounds", default="2,4", help="pre-training,fine-tuning rounds of each arm")
    p.add_argument(
        "--wire",
        default="int8",
        choices=["float32", "float16", "bfloat16", "int8"],
        help="wire precision of the deployed run",
    )
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-deployment", action="store_true")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench/results/federation.json"))
    args = p.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from fedecho.synth import synthesize

    work = Path(args.work or tempfile.mkdtemp(prefix="fedecho-bench-federation-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"byte_configurations": byte_configurations(args.model)}
    for c in result["byte_configurations"]:
        print(f"{c['phase']:9s} frozen={c['freeze_encoder']!s:5s} {c['fusion']:3s} {c['wire']:8s} "
              f"{c['bytes'] / 1e6:8.2f} MB  {c['ratio']:.4f}x of fp32 full")  # fmt: skip

    if not args.skip_deployment:
        data = work / "phantom"
        if not data.exists():
            synthesize(data, videos=args.videos, sites=2, seed=0, max_frames=48, progress=False)
        text = run_toml("bench-federation", args.model, wire=args.wire, freeze=True, rounds=(args.rounds, args.rounds),
                        steps=args.steps, batch=args.batch)  # fmt: skip
        run_id, seconds = deployed_run(work / "deploy", data, text, args.device, work / "deploy.log")
        rounds = round_costs(work / "deploy" / "server", run_id)
        timed = [r for r in rounds if r["measured"]]
        full_pre = full_fp32_bytes(args.model, "pretrain")
        full_ft = full_fp32_bytes(args.model, "finetune")

        def ratio(phase: str, full: int, first: bool = True) -> float:
            rs = [r for r in rounds if r["phase"] == phase and (first or r["round"] > 1)]
            return statistics.mean((r["bytes_down_per_site"] + r["bytes_up_per_site"]) / (2 * full) for r in rs)

        result["deployment"] = {
            "model": args.model, "fusion": "stf", "wire": args.wire, "steps": args.steps, "batch": args.batch,
            "device": args.device, "sites": 2, "seconds": seconds, "rounds": rounds,
            "overhead_mean": statistics.mean(r["overhead"] for r in timed),
            "overhead_s_mean": statistics.mean(r["overhead_s"] for r in timed),
            "slowest_site_s_mean": statistics.mean(r["slowest_site_s"] for r in timed),
            "full_fp32_bytes": {"pretrain": full_pre, "finetune": full_ft},
            "bytes_ratio_pretrain": ratio("pretrain", full_pre),
            # round 1 also carries the frozen encoder, once per site; later rounds only STF-Net and the head
            "bytes_ratio_finetune_frozen": ratio("finetune", full_ft, first=False),
        }  # fmt: skip
        first = next(r for r in rounds if r["phase"] == "finetune" and r["round"] == 1)
        result["deployment"]["bytes_ratio_finetune_frozen_round1"] = (
            first["bytes_down_per_site"] + first["bytes_up_per_site"]
        ) / (2 * full_ft)
        for r in rounds:
            timing = "evaluates, not timed"
            if r["measured"]:
                timing = f"wall {r['wall_s']:.1f} s, overhead {r['overhead_s']:.1f} s ({100 * r['overhead']:.1f} %)"
            mb = f"down {r['bytes_down_per_site'] / 1e6:.2f} MB, up {r['bytes_up_per_site'] / 1e6:.2f} MB per site"
            print(f"{r['phase']} round {r['round']}: slowest site {r['slowest_site_s']:.1f} s, {timing}, {mb}")

    if not args.skip_accuracy:
        data = work / "phantom-accuracy"
        if not data.exists():
            synthesize(data, videos=args.accuracy_videos, sites=2, seed=1, max_frames=64, progress=False)
        pre_r, ft_r = (int(x) for x in args.accuracy_rounds.split(","))
        arms = []
        for k, (name, wire, freeze, fusion) in enumerate(ARMS):
            text = run_toml(f"arm{k}", args.accuracy_model, wire=wire, freeze=freeze, fusion=fusion,
                            rounds=(pre_r, ft_r), epochs=1, batch=4)  # fmt: skip
            arm = {"arm": name, "wire": wire, "freeze_encoder": freeze, "fusion": fusion,
                   **simulated_arm(data, work / f"sim-arm{k}", text)}  # fmt: skip
            print(f"{name}: pre-training val loss {arm['pretrain_val_loss']:.4f}, "
                  f"EF MAE {arm['finetune_val_ef_mae']:.2f} ({arm['seconds']:.0f} s)")  # fmt: skip
            arms.append(arm)
        result["accuracy"] = {"model": args.accuracy_model, "videos": args.accuracy_videos, "rounds": [pre_r, ft_r],
                              "seed": 0, "sites": 2, "arms": arms}  # fmt: skip

    if "deployment" in result:
        result["table"] = table(result)
        for row in result["table"]:
            print(f"{row['measure']}: {row['value']} {row['unit']} (target {row['target']}, met {row['met']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
