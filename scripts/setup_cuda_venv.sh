#!/usr/bin/env bash
# A second venv, .venv-cuda, with jax's CUDA 12 wheels and the runtime deps (no torch): enough to compile for
# GPUs on a machine without one (python -m jaxmoe.aot, tests_gpu/), and to train on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-cuda
.venv-cuda/bin/pip install -q --upgrade pip
grep -v -E '^(torch|jax|jaxlib)==' requirements.txt > .venv-cuda/requirements.txt
.venv-cuda/bin/pip install -q -r .venv-cuda/requirements.txt -r requirements-gpu.txt
.venv-cuda/bin/pip install -q --no-deps -e .
