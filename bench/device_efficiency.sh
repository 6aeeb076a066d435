#!/bin/bash
# Issue 27's GPU measurement as one command for a lent GPU machine (the device tool's `run`), which
# has torch but not DeepSpeed: carry `.whl` (wheels fetched here, see docs/development.md, "The GPU kit") and
# run from the repository root:
#     bash bench/device_efficiency.sh            (run: carry [".whl"], timeout_s 560)
# Installs the wheels into /tmp/site, prints the GPU, then `gpu_check.py --efficiency` within
# EFFICIENCY_BUDGET_S (default 420 s; runs in priority order, written as they finish) into $OUT.
set -o pipefail
OUT=${OUT:-runs/efficiency}
mkdir -p "$OUT"
ls .whl/*.whl > /dev/null 2>&1 || { echo "device_efficiency: no .whl/*.whl (fetch the wheels first: docs/development.md, The GPU kit)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} DS_BUILD_OPS=0 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 bench/gpu_check.py --efficiency --out "$OUT/calibration.json" --budget_s "${EFFICIENCY_BUDGET_S:-420}" "$@" \
    2>&1 | grep -v "learning rate from scheduler" | tee "$OUT/efficiency.log"
