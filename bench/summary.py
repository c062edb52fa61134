"""Collect every benchmark's table rows into bench/results/latest.json and print one markdown table.

    python bench/summary.py            # after the bench scripts (`make bench` runs them all, then this)

Each bench script writes bench/results/NAME.json with a "table": rows of {item, measure, value,
unit, target, met}. This script does no measuring: it gathers, stamps the machine and the commit,
and prints the table the manual's Benchmarks page shows (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

# The order of the table: the benchmark targets' groups, then the local-training science checks.
ORDER = [
    "mae_step", "finetune_step", "dp_step", "ddp_step", "data_loader", "dicom_ingest", "federation",
    "federation_recommended", "federated_accuracy", "scale", "local_training", "local_training_few_labels",
    "phantom_learnability",
]  # fmt: skip


def commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return res.stdout.strip() or "unknown"


def fmt_value(value: Any, unit: str) -> str:
    if isinstance(value, float) and unit == "x" and abs(value) < 0.01:
        return f"{value:.5f}x"
    return f"{value}x" if unit == "x" else f"{value} {unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    files = {f.stem: f for f in args.results.glob("*.json") if f.stem != "latest"}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    rows: list[dict[str, Any]] = []
    for name in names:
        data = json.loads(files[name].read_text())
        stamp = time.strftime("%Y-%m-%d", time.gmtime(files[name].stat().st_mtime))
        rows += [{**r, "bench": name, "measured": stamp} for r in data.get("table", [])]
    latest = {
        "commit": commit(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "rows": rows,
    }  # fmt: skip
    (args.results / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    print("| group | measure | value | target | met |")
    print("|---|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        print(f"| {r['item']} | {r['measure']} | {fmt_value(r['value'], r['unit'])} | {r['target'] or ''} | {met} |")


if __name__ == "__main__":
    main()
