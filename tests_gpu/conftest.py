"""GPU-compile tests: XLA's real GPU pipeline (Triton included) on compile-only H100 devices, no GPU needed.
Run in the CUDA-wheel venv (README: `pip install -e '.[cuda12]'`): `python -m pytest -q tests_gpu`."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the running backend; the programs target the simulated GPUs
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
