#!/usr/bin/env bash
# Everything still owed to a real GPU, as one run of at most ~8 minutes on one H100 / H200; run it whenever a
# GPU is at hand and record what it prints in docs/performance.md (device, date, command).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check_out (JSON files + gpu_check.log)
#
# Steps (each bounded by its own timeout, so one failure leaves the others' numbers):
#   1. GPU-only paths == references: ragged_all_to_all dispatch vs all_to_all, Pallas kernels vs jnp (numerics)
#   2. kernel timings vs jax.nn.dot_product_attention(implementation="cudnn") and jax.lax.ragged_dot
#   3. the GLM-4.5-Air-width proxy's train step: tokens/s, MFU, peak memory (scripts/bench_train.py)
#   4. transformers' baseline on the same proxy (scripts/bench_hf.py)
# Uses the box's python3 with jax (CUDA) installed; this checkout is put on PYTHONPATH (nothing is installed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo "== 1. numerics";   timeout 120 $py scripts/gpu_numerics.py --json "$out/numerics.json"
  echo "== 2. kernels";    timeout 150 $py scripts/bench_kernels.py --out "$out/kernels.json"
  echo "== 3. train step"; timeout 150 $py scripts/bench_train.py --config configs/air_proxy_4k.yaml --steps 5 \
                                   --json "$out/train.json"
  echo "== 4. transformers baseline"; timeout 60 $py scripts/bench_hf.py --config configs/air_proxy_4k.yaml \
                                   --steps 3 --json "$out/hf.json"
} 2>&1 | tee "$out/gpu_check.log"
