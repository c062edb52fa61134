#!/usr/bin/env bash
# The benchmark suite on a CUDA machine, in one command:
#
#     bench/cuda.sh [RESULTS_DIR]        # default bench/results/cuda
#
# Fails at once, with a message, when torch sees no CUDA device. Each bench script that has a
# --device option gets --device cuda (training then runs under bf16 autocast: fedecho.train.engine);
# the others run as they are and pick CUDA themselves where they train through fedecho.train
# (pick_device: cuda when available). Every script writes its JSON to RESULTS_DIR, so the CPU figures
# in bench/results/ stay as they are. At the end bench/summary.py gathers their table rows into
# RESULTS_DIR/latest.json and prints the markdown table. A failing script is reported and the others
# still run; the exit status is non-zero if any failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-bench/results/cuda}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/cuda.sh: no CUDA device (torch.cuda.is_available() is False); nothing was run" >&2
    exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"CUDA: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")'
mkdir -p "$OUT"

failed=()
for script in bench/phantom_learnability.py bench/local_training.py bench/dp_step.py bench/mae_step.py \
    bench/finetune_step.py bench/data_loader.py bench/dicom_ingest.py bench/federation.py \
    bench/federated_accuracy.py bench/scale.py; do
    [ -f "$script" ] || continue
    name=$(basename "$script" .py)
    help=$("$PY" "$script" --help 2>/dev/null)
    if ! grep -q -- "--out" <<<"$help"; then
        echo "== $script: skipped (no --out option: it would overwrite the CPU figures)"
        continue
    fi
    args=(--out "$OUT/$name.json")
    # scale.py: the simulation's virtual sites run on CPU (Ray gives them no GPU)
    if [ "$name" != scale ] && grep -q -- "--device" <<<"$help"; then
        args+=(--device cuda)
    fi
    echo "== $script ${args[*]}"
    if ! "$PY" "$script" "${args[@]}"; then
        failed+=("$script")
    fi
done
echo "== bench/summary.py --results $OUT"
if ! "$PY" bench/summary.py --results "$OUT"; then
    failed+=(bench/summary.py)
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench/cuda.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "bench/cuda.sh: results in $OUT"
