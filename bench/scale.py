"""Scale: `fedecho sim` with 5, 20 and 50 sites, 3 rounds of echo_vit_tiny each.

    python bench/scale.py [--sites 5,20,50] [--rounds 3] [--cpus-per-site 1]

One phantom of per-site folders (3 videos per site, each site its own vendor) serves every size: the
simulation takes the first N folders. Each site trains one local step (batch 2) per round of
masked-autoencoder pre-training; the federated evaluation runs only after the last round. Per size:
- time per round: from a round's start to the next round's start, read from the run store
  (sampling, every site's work, checks, aggregation, store writes and the checkpoint); the last round,
  which also evaluates, is left out. Round 1 also starts Ray's workers (each imports torch): the
  steady state is the later rounds ("warm"), on which the linearity target is judged;
- peak memory: the proportional set size (PSS, so pages shared between Ray workers count once) summed
  over this process and all its descendants (Ray's GCS, raylet and workers), sampled every 0.5 s from
  /proc (Linux).
The target: cost per round grows no faster than linearly with the sites, i.e. the cost per participating
site and round at every size is at most (1 + --tolerance) times that at the smallest size.
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _table import table_row

RUN_TOML = """
[run]
name = "scale-{sites}"
seed = 0
wire_dtype = "float16"

[model]
name = "echo_vit_tiny"

[data]
max_test_clips = 1

[pretrain]
rounds = {rounds}
steps = 1
batch_size = 2
lr = 1e-3
eval_every = 0
"""


def descendants(root: int) -> list[int]:
    """root and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_pss_mb(root: int) -> float:
    """PSS of a process tree in MB (shared pages split between the processes that map them)."""
    total_kb = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024


class PeakMemory:
    """Samples the PSS of this process tree in a thread; `peak_mb` once stopped."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_pss_mb(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_size(data: Path, state: Path, sites: int, rounds: int, cpus_per_site: float) -> dict[str, Any]:
    """A whole simulation with `sites` sites; time per round from the store, peak memory of the tree."""
    from fedecho.client.policy import SMALL_PHANTOM_POLICY
    from fedecho.fl.config import parse_run_config
    from fedecho.sim.run import simulate
    from fedecho.storage import Store
    from fedecho.storage.store import store_url

    cfg = parse_run_config(RUN_TOML.format(sites=sites, rounds=rounds))
    t0 = time.time()
    with PeakMemory() as mem:
        run_id = simulate(
            cfg, data, state, sites=sites, cpus_per_site=cpus_per_site, default_policy=SMALL_PHANTOM_POLICY
        )
    seconds = time.time() - t0
    with Store(store_url(state)) as store:
        rows = sorted(store.rounds(run_id), key=lambda r: r.round)
    walls = [b.started - a.started for a, b in itertools.pairwise(rows)]
    return {
        "sites": sites,
        "rounds": len(rows),
        "round_walls_s": walls,
        "s_per_round": statistics.mean(walls),
        "s_per_round_warm": statistics.mean(walls[1:] or walls),
        "s_per_site_round": statistics.mean(walls[1:] or walls) / sites,
        "peak_pss_mb": mem.peak_mb,
        "total_s": seconds,
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


row = functools.partial(table_row, "Scale")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", default="5,20,50")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs per virtual site")
    p.add_argument("--device", default="cpu", help="cpu; cuda is refused (the simulation's sites run on CPU)")
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed growth of the cost per site (noise)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    args = p.parse_args()
    if args.device != "cpu":
        sys.exit("bench/scale.py measures the simulation engine's sites on CPU only (Ray gives them no GPU)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fedecho.synth import synthesize

    sizes = [int(s) for s in args.sites.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="fedecho-bench-scale-"))
    data = work / "phantom"
    if not data.exists():
        synthesize(data, videos=3 * max(sizes), sites=max(sizes), seed=0, max_frames=32, progress=False)
    results = []
    for n in sizes:
        res = one_size(data, work / f"state-{n}", n, args.rounds, args.cpus_per_site)
        print(f"{n:3d} sites: {res['s_per_round_warm']:.1f} s/round warm ({res['s_per_site_round']:.2f} s per site), "
              f"peak {res['peak_pss_mb']:.0f} MB PSS, {res['total_s']:.0f} s in all")  # fmt: skip
        results.append(res)
    xs, ys = [float(r["sites"]) for r in results], [r["s_per_round_warm"] for r in results]
    intercept, slope = linear_fit(xs, ys)
    marginal = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    # No faster than linear: the cost of a round per participating site does not grow with the number of sites.
    per_site = [r["s_per_site_round"] for r in results]
    linear = all(c <= per_site[0] * (1 + args.tolerance) for c in per_site[1:])
    table = [
        row(f"time per round incl. round 1 (Ray start), {r['sites']} sites", round(r["s_per_round"], 2), "s/round")
        for r in results
    ] + [
        row(f"time per round, warm, {r['sites']} sites", round(r["s_per_round_warm"], 2), "s/round") for r in results
    ] + [
        row(f"time per site per round, warm, {r['sites']} sites", round(r["s_per_site_round"], 3), "s/site")
        for r in results
    ] + [
        row(f"peak memory (PSS, process tree), {r['sites']} sites", round(r["peak_pss_mb"]), "MB") for r in results
    ] + [
        row(f"marginal cost per site, {xs[i]:.0f} -> {xs[i + 1]:.0f} sites", round(m, 3), "s/site")
        for i, m in enumerate(marginal)
    ] + [
        row("fit: time per round = a + b x sites, b", round(slope, 3), "s/site"),
        row(f"largest / smallest cost per site per round ({sizes[-1]} vs {sizes[0]} sites)",
            round(max(per_site[1:]) / per_site[0], 2), "x", f"<= {1 + args.tolerance:.2f}x (no faster than linear)",
            linear),
    ]  # fmt: skip
    for t in table:
        print(
            f"{t['measure']}: {t['value']} {t['unit']}"
            + (f" (target {t['target']}, met {t['met']})" if t["target"] else "")
        )
    result = {
        "model": "echo_vit_tiny", "rounds": args.rounds, "local_steps": 1, "batch": 2, "videos_per_site": 3,
        "cpus": os.cpu_count(), "cpus_per_site": args.cpus_per_site, "sizes": results,
        "fit": {"intercept_s": intercept, "slope_s_per_site": slope}, "marginal_s_per_site": marginal,
        "tolerance": args.tolerance, "table": table,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
