"""Every Pallas kernel, forward and backward, compiles for sm_90 through Triton (not interpreted) at the tiny
model's shapes and at GLM-4.5-Air's; a kernel that stops lowering, or silently falls back to XLA, fails here."""
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe import aot
from jaxmoe.kernels import gmm as gmm_lib
from jaxmoe.kernels.flash_attention import flash_attention
from jaxmoe.kernels.rms_norm import rms_norm

BF16 = jnp.bfloat16


@functools.lru_cache(maxsize=1)
def one_gpu():
    return aot.gpu_devices(aot.GPUS["h100"], 1)[0]


def compile_on_gpu(fn, *shapes):
    """Compile fn for one simulated H100; returns (HLO text, memory_analysis)."""
    sh = NamedSharding(Mesh([one_gpu()], ("x",)), P())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh) for s in shapes]
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.as_text(), compiled.memory_analysis()


def pallas_calls(hlo):
    return aot.triton_kernels(hlo)["pallas"]


def S(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


# (batch, seq, q heads, kv heads, head_dim): the tiny model, and GLM-4.5-Air at seq 4096
ATTENTION = {"tiny": (2, 128, 8, 4, 32), "air": (1, 4096, 96, 8, 128)}


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_flash_attention_fwd_bwd_compiles(name):
    B, T, Nq, Nkv, D = ATTENTION[name]

    def loss(q, k, v, seg, pos):
        out = flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_index=pos, kv_index=pos,
                              interpret=False)
        return out.astype(jnp.float32).sum()

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2))  # the forward stays live
    hlo, _ = compile_on_gpu(fn, S((B, T, Nq, D)), S((B, T, Nkv, D)), S((B, T, Nkv, D)), S((B, T), jnp.int32),
                            S((B, T), jnp.int32))
    assert pallas_calls(hlo) >= 2  # forward kernel + backward kernel(s)


# (rows, hidden, moe_intermediate, experts): the tiny model, and GLM-4.5-Air (8 of 128 experts per token)
GMM = {"tiny": (256, 64, 32, 8), "air": (4096 * 8, 4096, 1408, 128)}


@pytest.mark.parametrize("name", sorted(GMM))
def test_grouped_matmul_fwd_bwd_compiles_without_dense_fallback(name):
    M, H, F, E = GMM[name]

    def loss(x, w, sizes):
        return gmm_lib.gmm(x, w, sizes, interpret=False).astype(jnp.float32).sum()

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    hlo, ma = compile_on_gpu(fn, S((M, H)), S((E, H, F)), S((E,), jnp.int32))
    assert pallas_calls(hlo) >= 3  # gmm forward, gmm of the input gradient, tgmm of the weight gradient
    if name == "air":  # no dense all-experts intermediate (jax.lax.ragged_dot's GPU fallback plans 8 GiB here)
        assert ma.temp_size_in_bytes < 4 * (M * max(H, F) * 2), ma.temp_size_in_bytes


@pytest.mark.parametrize("name", ["tiny", "air"])
def test_rms_norm_fwd_bwd_compiles(name):
    T, H = (256, 64) if name == "tiny" else (4096, 4096)

    def loss(x, r, w):
        y, s = rms_norm(x, w, 1e-5, residual=r, interpret=False)
        return (y.astype(jnp.float32).sum() + s.astype(jnp.float32).sum())

    hlo, _ = compile_on_gpu(jax.value_and_grad(loss, argnums=(0, 1, 2)), S((T, H)), S((T, H)), S((H,), jnp.float32))
    assert pallas_calls(hlo) >= 2  # forward + backward
