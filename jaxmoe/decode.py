"""KV-cache decoding of the GLM4-MoE model: prefill a padded batch of prompts, then one token per step.

The cache is a pytree of static-shape arrays (so one compile serves every step):
  k, v   [layers, B, max_len, Nkv, D]  layers = dense stack then MoE stack, in model order
  valid  [B, max_len] bool             slots holding a real token (prompt padding and unwritten slots False)
  pos    [B] int32                     RoPE position of the row's next token (its real-token count)
  index  [] int32                      the slot the next token is written to (shared by all rows)
Prompt column j goes to slot j, so any padding (left, right, or both) works: attention masks by `valid`,
RoPE uses per-row positions counted over real tokens only. Generated tokens go to slots T, T+1, ...
for every row at once, which keeps the update a single `lax.dynamic_update_slice`.

Layer math reuses jaxmoe.model (qkv_proj / out_proj / rms_norm / swiglu / moe_mlp), so each token is
normed, projected and routed exactly as in the training forward; only attention differs: prefill uses the
model's attention op with segment ids, the step a plain masked jnp attention over the cache.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model import reference_ops
from jaxmoe.model.layers import ops_for, out_proj, qkv_proj, rms_norm, rope_tables, swiglu
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.transformer import embed_tokens, lm_logits, moe_mlp


def _layer(p, h, bias, rope, valid, attend, c: ModelConfig, opts: ModelOptions):
    """One pre-norm decoder layer with a pluggable attention: attend(q, k, v) -> (o, extra)."""
    x = rms_norm(h, p["attn_norm"], c.rms_norm_eps, opts)
    q, k, v = qkv_proj(p, x, rope, c, opts)
    o, extra = attend(q, k, v)
    h = h + out_proj(p, o, opts)
    x = rms_norm(h, p["mlp_norm"], c.rms_norm_eps, opts)
    if bias is None:
        y = swiglu(p, x, "mlp", opts)
    else:
        y, _ = moe_mlp(p, x, bias, valid, c, opts)  # routing stats are for training; dropped here
    return h + y, extra


def _stacks(params, state):
    """[(layer stack, router biases or None)] in model order."""
    out = []
    if "dense" in params:
        out.append((params["dense"], None))
    if "moe" in params:
        out.append((params["moe"], state["moe_bias"]))
    return out


def init_cache(c: ModelConfig, batch: int, max_len: int, dtype) -> dict[str, Any]:
    shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "pos": jnp.zeros((batch,), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def prefill(params, state, tokens, prompt_mask, max_len: int, c: ModelConfig, opts: ModelOptions):
    """tokens, prompt_mask [B, T] (mask 1 on real tokens, 0 on padding anywhere) ->
    (logits [B, V] fp32 at each row's last real token, cache with room for max_len slots).

    Every row needs at least one real token (checked by the caller: traced code cannot raise).
    """
    B, T = tokens.shape
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    rope = rope_tables(positions, c)
    attn = ops_for(opts).attention

    def attend(q, k, v):
        # Column order is position order among real tokens, so causality by column is right; segment
        # ids keep real tokens away from padding (pads only see pads, so no row is fully masked).
        o = attn(q, k, v, q_segment_ids=mask, kv_segment_ids=mask, causal=True)
        return o, (k, v)

    h = embed_tokens(params, tokens, opts)
    ks, vs = [], []
    for stack, biases in _stacks(params, state):
        def body(carry, xs):
            p, b = xs
            return _layer(p, carry, b, rope, mask > 0, attend, c, opts)

        h, (k, v) = jax.lax.scan(body, h, (stack, biases))
        ks.append(k)
        vs.append(v)
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # each row's last real column
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
    h_last = rms_norm(h_last, params["final_norm"], c.rms_norm_eps, opts)
    logits = lm_logits(params, h_last, opts)[:, 0]

    cache = init_cache(c, B, max_len, opts.dtype)
    zero = jnp.zeros((), jnp.int32)
    cache["k"] = jax.lax.dynamic_update_slice(cache["k"], jnp.concatenate(ks).astype(opts.dtype), (zero,) * 5)
    cache["v"] = jax.lax.dynamic_update_slice(cache["v"], jnp.concatenate(vs).astype(opts.dtype), (zero,) * 5)
    cache["valid"] = cache["valid"].at[:, :T].set(mask > 0)
    cache["pos"] = mask.sum(axis=1).astype(jnp.int32)
    cache["index"] = jnp.asarray(T, jnp.int32)
    return logits, cache


def step(params, state, cache, tokens, c: ModelConfig, opts: ModelOptions):
    """Feed one token per row (tokens [B]) at cache['index'] -> (logits [B, V] fp32, updated cache).

    The caller must keep index < max_len (the cache cannot grow; an out-of-range write would be clamped).
    """
    B = tokens.shape[0]
    idx = cache["index"]
    zero = jnp.zeros((), jnp.int32)
    valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((B, 1), bool), (zero, idx))
    kv_seg = valid.astype(jnp.int32)
    q_seg = jnp.ones((B, 1), jnp.int32)
    rope = rope_tables(cache["pos"][:, None], c)
    h = embed_tokens(params, tokens[:, None], opts)

    k_all, v_all = cache["k"], cache["v"]
    layer0 = 0
    for stack, biases in _stacks(params, state):
        n = jax.tree.leaves(stack)[0].shape[0]

        def body(carry, xs):
            h, k_all, v_all = carry
            p, b, li = xs

            def attend(q, k, v):
                start = (li, zero, idx, zero, zero)
                ka = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
                va = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
                kl = jax.lax.dynamic_index_in_dim(ka, li, 0, keepdims=False)
                vl = jax.lax.dynamic_index_in_dim(va, li, 0, keepdims=False)
                # Plain jnp GQA (q heads grouped per kv head, no K/V repeat), masked to the valid slots.
                o = reference_ops.attention(q, kl, vl, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                            causal=False)
                return o, (ka, va)

            h, (k_all, v_all) = _layer(p, h, b, rope, q_seg > 0, attend, c, opts)
            return (h, k_all, v_all), None

        layer_ids = jnp.arange(layer0, layer0 + n, dtype=jnp.int32)
        (h, k_all, v_all), _ = jax.lax.scan(body, (h, k_all, v_all), (stack, biases, layer_ids))
        layer0 += n
    h = rms_norm(h, params["final_norm"], c.rms_norm_eps, opts)
    logits = lm_logits(params, h, opts)[:, 0]
    new_cache = {"k": k_all, "v": v_all, "valid": valid, "pos": cache["pos"] + 1, "index": idx + 1}
    return logits, new_cache
