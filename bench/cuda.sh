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
# RESULTS_DIR/latest.json and prints the markdown table. Where several GPUs are visible it also takes the
# data-parallel step-time ratio (bench/ddp_step.py), and it runs a 2-site `fedecho sim` whose virtual sites
# train on the GPU. A failing script is reported and the others still run; the exit status is non-zero if any
# failed.
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
    # scale.py measures the simulation's overhead on the CPU; the GPU simulation is the 2-site run below
    if [ "$name" != scale ] && grep -q -- "--device" <<<"$help"; then
        args+=(--device cuda)
    fi
    echo "== $script ${args[*]}"
    if ! "$PY" "$script" "${args[@]}"; then
        failed+=("$script")
    fi
done
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
    # data-parallel pre-training: step time on 1 GPU against all of them, at the same global batch
    echo "== bench/ddp_step.py --device cuda --out $OUT/ddp_step.json ($gpus GPUs)"
    if ! "$PY" bench/ddp_step.py --device cuda --out "$OUT/ddp_step.json"; then
        failed+=(bench/ddp_step.py)
    fi
else
    echo "== bench/ddp_step.py: skipped (one GPU: no data-parallel ratio to take)"
fi

# A 2-site simulation whose virtual sites train on the GPU (half of it each); nvidia-smi lists the processes
# that held GPU memory meanwhile, so the log shows the sites were there, not on the CPU.
echo "== fedecho sim --config configs/quickstart.toml --sites 2 --gpus-per-site 0.5"
rm -rf "$OUT/sim-gpu"
apps="$OUT/sim-gpu-apps.csv"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader -l 1 >"$apps" 2>/dev/null &
watch=$!
start=$(date +%s)
if "$(dirname "$PY")/fedecho" sim --config configs/quickstart.toml --sites 2 --videos 80 --state "$OUT/sim-gpu" \
    --gpus-per-site 0.5 >"$OUT/sim-gpu.log" 2>&1; then
    status=0
else
    status=$?
    failed+=("fedecho sim on the GPU (see $OUT/sim-gpu.log)")
fi
kill "$watch" 2>/dev/null
seconds=$(($(date +%s) - start))
pids=$(cut -d, -f1 "$apps" 2>/dev/null | sort -u | grep -c . || true)
echo "fedecho sim on the GPU: exit $status in ${seconds} s; $pids process(es) held GPU memory (nvidia-smi)"
tail -n 25 "$OUT/sim-gpu.log"
printf '{"exit": %s, "seconds": %s, "gpu_processes": %s, "sites": 2, "gpus_per_site": 0.5}\n' \
    "$status" "$seconds" "$pids" >"$OUT/sim_gpu.json"

echo "== bench/summary.py --results $OUT"
if ! "$PY" bench/summary.py --results "$OUT"; then
    failed+=(bench/summary.py)
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench/cuda.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "bench/cuda.sh: results in $OUT"
