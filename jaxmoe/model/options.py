"""Static, hashable options of one model run (compute dtype, kernels, remat, MoE transport, sharding).

They are jit-static: changing one recompiles. Numerics of every choice equal the reference path
(`ModelOptions()` in float32, one device), which the tests prove.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxmoe.sharding import Sharding

REMAT_CHOICES = ("none", "full", "selective")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    compute_dtype: str = "float32"  # matmul/activation dtype; router, norms, softmax and loss stay fp32
    kernels: str = "reference"  # --kernels spec: auto | pallas | reference | per-op "attention=pallas,..."
    remat: str = "none"  # none | full | selective (Megatron --recompute_granularity)
    remat_modules: tuple[str, ...] = ()  # selective: which pieces to recompute (core_attn, moe_act, mlp, ...)
    moe_transport: str = "auto"  # EP token dispatch: auto | all_gather | all_to_all | ragged (GPU)
    # The platform the program is compiled for ("gpu", "cpu"); None = the running backend. Set explicitly when
    # compiling for devices other than the running backend's (jaxmoe.aot: compile-only GPUs on a CPU host).
    platform: str | None = None
    # The mesh and logical-axis rules activations are constrained with (parallel/setup.py Parallel.sharding);
    # the default has no mesh: one device, no constraints.
    sharding: Sharding = Sharding()

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def __post_init__(self):
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat={self.remat!r}: choose one of {REMAT_CHOICES}")
        jnp.dtype(self.compute_dtype)  # raises on unknown dtype names
