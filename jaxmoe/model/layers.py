"""Transformer pieces of GLM4-MoE: RMSNorm, partial rotate-half RoPE, GQA attention, SwiGLU MLP.

Pure functions over parameter dicts (see params.py). Matmuls run in the compute dtype; norms, RoPE tables
and softmax in fp32, matching transformers' Glm4Moe modules op for op.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.deltas import add_deltas, linear
from jaxmoe.model.options import ModelOptions
from jaxmoe.model import reference_ops


Q_AXES = ("batch", "length_attn", "heads", "head_dim")
KV_AXES = ("batch", "length_attn", "kv_heads", "head_dim")


def ops_for(opts: ModelOptions):
    if opts.kernels == "reference":
        return reference_ops.OPS
    from jaxmoe.kernels.ops import KernelConfig, get_ops  # Pallas path (GPU, or interpret mode in tests)
    interpret = None if opts.platform is None else opts.platform == "cpu"
    return get_ops(KernelConfig.from_flag(opts.kernels, interpret), backend=opts.platform)


def uses_pallas(opts: ModelOptions, op: str) -> bool:
    return getattr(ops_for(opts), "choice", {}).get(op) == "pallas"


def rms_norm(x, weight, eps, opts: ModelOptions, axes=None):
    """HF Glm4MoeRMSNorm: normalise in fp32, cast back, then scale by the weight. `axes`: x's logical axes
    (default: the hidden states', ACT), which the Pallas kernel runs split by (Sharding.kernel)."""
    norm = lambda x, w: ops_for(opts).rms_norm(x, w, eps)
    if uses_pallas(opts, "rms_norm"):
        axes = axes or ("batch", "length", "embed")[-x.ndim:]
        norm = opts.sharding.kernel(norm, (axes, None), axes)
    return norm(x, weight.astype(x.dtype))


def rope_tables(positions, c: ModelConfig):
    """cos/sin [B, T, rotary_dim] in fp32 for integer positions [B, T]."""
    dim = c.rotary_dim
    inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Non-interleaved (rotate-half) RoPE on the first rotary_dim dims of each head; x [B, T, N, D]."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def qkv_proj(p, x, positions_rope, c: ModelConfig, opts: ModelOptions):
    """q [B, T, Nq, D], k, v [B, T, Nkv, D] after bias, qk-norm and RoPE."""
    dt = opts.dtype
    qkv = add_deltas(p, x, {n: jnp.einsum("bth,hnd->btnd", x, p[n].astype(dt)) for n in ("wq", "wk", "wv")})
    q, k, v = qkv["wq"], qkv["wk"], qkv["wv"]
    if "bq" in p:
        q = q + p["bq"].astype(dt)
        k = k + p["bk"].astype(dt)
        v = v + p["bv"].astype(dt)
    if "q_norm" in p:
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps, opts, Q_AXES)
        k = rms_norm(k, p["k_norm"], c.rms_norm_eps, opts, KV_AXES)
    cos, sin = positions_rope
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def out_proj(p, o, opts: ModelOptions):
    return linear(p, "wo", o, "btnd,ndh->bth", opts.dtype, n_in=2)


def attention_block(p, x, rope, segment_ids, c: ModelConfig, opts: ModelOptions, token_index=None):
    """Self-attention sub-block (no residual). x [B, T, H] in compute dtype.

    `token_index` [B, T] is each token's position in the whole (unsplit) sequence; causality uses it, so
    context-parallel callers can pass their chunk's global indices. Packed segments never attend across.
    """
    q, k, v = qkv_proj(p, x, rope, c, opts)
    sh = opts.sharding
    q = sh.constrain(q, Q_AXES)
    k = sh.constrain(k, KV_AXES)
    v = sh.constrain(v, KV_AXES)
    # context parallel (keys span all sequence ranks), or a Pallas kernel, which must run per device
    if sh.mesh is not None and (sh.mesh.shape["sequence"] > 1 or uses_pallas(opts, "attention")):
        from jaxmoe.parallel.context import context_attention
        out = context_attention(ops_for(opts).attention, q, k, v, segment_ids, token_index, sh)
    else:
        out = ops_for(opts).attention(
            q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
            q_index=token_index, kv_index=token_index, causal=True)
    out = sh.constrain(out, Q_AXES)
    return out_proj(p, out, opts)


def swiglu(p, x, prefix: str, opts: ModelOptions):
    """Megatron fc1 -> SwiGLU -> fc2 of the dense MLP (prefix "mlp") or the shared expert ("shared"):
    p[prefix_wi] [H, 2, F] holds (gate, up), p[prefix_wo] is [F, H]."""
    dt = opts.dtype
    gu = linear(p, f"{prefix}_wi", x, "...h,hcf->...cf", dt)
    h = jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]
    h = opts.sharding.constrain(h, ("batch", "length_attn", "mlp")) if h.ndim == 3 else h
    return linear(p, f"{prefix}_wo", h, "...f,fh->...h", dt)
