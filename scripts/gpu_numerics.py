"""On a real GPU: the GPU-only paths against their references, as numbers (written to --json).

  ragged    the expert dispatch with jax.lax.ragged_all_to_all == the all_to_all transport (forward and
            gradients), through make_ep_dispatch on a one-device mesh (the exchange runs; peers are itself)
  kernels   each Pallas kernel compiled by Triton == its plain-jnp reference (max abs error, fp32 and bf16)

    python scripts/gpu_numerics.py --json out.json        # a GPU box (scripts/gpu_check.sh runs it)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmoe.kernels import gmm as gmm_lib  # noqa: E402
from jaxmoe.kernels.attention import attention_reference, flash_attention  # noqa: E402
from jaxmoe.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from jaxmoe.mesh import MeshSpec, make_mesh  # noqa: E402
from jaxmoe.model.options import ModelOptions  # noqa: E402
from jaxmoe.moe.ep import make_ep_dispatch  # noqa: E402


def err(a, b) -> float:
    return float(max(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def ragged_vs_all_to_all(tokens=512, hidden=256, ffn=128, experts=8, k=2) -> dict:
    mesh = make_mesh(MeshSpec(), jax.devices()[:1])
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (1, tokens, hidden))
    idx = jax.random.randint(keys[1], (1, tokens, k), 0, experts)
    w = jax.nn.softmax(jax.random.normal(keys[2], (1, tokens, k)), -1)
    wi = 0.05 * jax.random.normal(keys[3], (experts, hidden, 2, ffn))
    wo = 0.05 * jax.random.normal(keys[4], (experts, ffn, hidden))
    opts = ModelOptions(compute_dtype="float32", kernels="reference")

    def run(transport):
        d = make_ep_dispatch(mesh, transport)
        f = lambda x, wi, wo: jnp.sum(d(x, idx, w, wi, wo, opts) ** 2)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, wi, wo)

    return {"ragged_vs_all_to_all_max_abs": err(run("ragged"), run("all_to_all"))}


def kernels_vs_reference() -> dict:
    out = {}
    keys = jax.random.split(jax.random.key(1), 6)
    for dt in (jnp.float32, jnp.bfloat16):
        q = jax.random.normal(keys[0], (2, 512, 8, 128), dt)
        kv = jax.random.normal(keys[1], (2, 512, 2, 128), dt)
        attn = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2),
                                                    argnums=(0, 1, 2)))(q, kv, kv)
        out[f"flash_attention_{jnp.dtype(dt).name}"] = err(attn(lambda q, k, v: flash_attention(q, k, v)),
                                                           attn(attention_reference))
        x = jax.random.normal(keys[2], (1024, 512), dt)
        wg = (0.05 * jax.random.normal(keys[3], (8, 512, 256))).astype(dt)
        sizes = jnp.array([100, 0, 300, 24, 200, 200, 100, 100], jnp.int32)
        g = lambda f: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w, sizes).astype(jnp.float32) ** 2),
                                                 argnums=(0, 1)))(x, wg)
        out[f"gmm_{jnp.dtype(dt).name}"] = err(g(gmm_lib.gmm), g(gmm_lib.gmm_reference))
        w = jnp.ones((512,), jnp.float32)
        r = lambda f: jax.jit(jax.value_and_grad(lambda x: jnp.sum(f(x, w, 1e-5).astype(jnp.float32) ** 2)))(x)
        out[f"rms_norm_{jnp.dtype(dt).name}"] = err(r(rms_norm), r(rms_norm_reference))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    dev = jax.devices()[0]
    r = {"device": dev.device_kind, "jax": jax.__version__, **ragged_vs_all_to_all(), **kernels_vs_reference()}
    print(json.dumps(r, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
