"""Context parallelism: the sequence (length) dim split over the `sequence` mesh axis.

Load balancing (Megatron's causal CP layout): each row's tokens are cut into 2*cp equal chunks and
sequence rank i holds chunks i and 2*cp-1-i, so every rank gets the same amount of causal attention work
(one early, cheap chunk and one late, expensive one). This is a host-side permutation of every [B, T]
batch field (`permute_batch`, called by parallel/batch.py); the ordinary contiguous sharding of the
length dim over `sequence` then hands each rank its two chunks. A `token_index` field keeps each token's
original position, which the causal mask compares (never the storage order).

Everything per token (embeddings, MLPs, MoE, the loss and its counts) is a sum over tokens and does not
care about the order. What does care is shifting along the sequence (MTP's "token i+1 ahead" labels and
masks), so `permute_batch` computes those shifts on the natural order first and carries them as extra
fields (`labels_shift{d}`, `loss_mask_shift{d}`) that transformer.shifted_field picks up.

Attention (`context_attention`): a shard_map over the whole mesh; each device all-gathers K/V, the kv
segment ids and kv token indices over `sequence` (chunks land in rank order, i.e. the permuted order, and
the index-based mask makes that harmless) and runs the chosen attention op (reference or Pallas) of its
local queries against every key. GQA heads stay grouped (K/V are never repeated); under tensor
parallelism each device holds matching slices of q and kv heads. The gradient of the all-gather is a
reduce-scatter of dK/dV over `sequence`, which shard_map's transpose provides.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.sharding import Sharding

SHIFTED_KEYS = ("labels", "loss_mask")  # the fields MTP shifts (transformer.mtp_forward, train/loss.py)


def balance_permutation(T: int, cp: int) -> np.ndarray:
    """perm [T]: permuted[:, j] = original[:, perm[j]]; rank i's contiguous slice holds chunks i, 2cp-1-i."""
    if T % (2 * cp):
        raise ValueError(f"jaxmoe/parallel/context.py: sequence length {T} is not divisible by 2 x cp = {2 * cp}; "
                         f"set --max_length (or --seq_length) to a multiple of {2 * cp}")
    c = T // (2 * cp)
    chunks = []
    for i in range(cp):
        chunks += [np.arange(i * c, (i + 1) * c), np.arange((2 * cp - 1 - i) * c, (2 * cp - i) * c)]
    return np.concatenate(chunks).astype(np.int32)


def shift_in_segment_np(a: np.ndarray, segment_ids: np.ndarray, fill=0) -> np.ndarray:
    """Host twin of transformer.shift_in_segment: a[:, t] <- a[:, t+1] within the same non-padding segment."""
    nxt = np.concatenate([a[:, 1:], np.full_like(a[:, :1], fill)], axis=1)
    seg_next = np.concatenate([segment_ids[:, 1:], np.zeros_like(segment_ids[:, :1])], axis=1)
    same = (seg_next == segment_ids) & (segment_ids > 0)
    return np.where(same, nxt, np.asarray(fill, a.dtype))


def permute_batch(batch: dict, cp: int, mtp_depths: int = 0) -> dict:
    """Host batch in natural order -> the load-balanced order for `cp` sequence ranks.

    Adds `labels_shift{d}` / `loss_mask_shift{d}` for d = 1..mtp_depths (shifted before permuting) and
    `token_index` (each token's original position). Every [B, T] field is permuted the same way."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    if "token_index" in batch:
        raise ValueError("jaxmoe/parallel/context.py: the batch already has `token_index` (already permuted?); "
                         "pass Parallel.put_batch the batch in natural token order")
    B, T = batch["segment_ids"].shape
    seg = batch["segment_ids"]
    for key in SHIFTED_KEYS:
        if mtp_depths and key in batch:
            cur = batch[key]
            for d in range(1, mtp_depths + 1):
                cur = shift_in_segment_np(cur, seg)
                batch[f"{key}_shift{d}"] = cur
    perm = balance_permutation(T, cp)
    out = {}
    for k, v in batch.items():
        if v.ndim < 2 or v.shape[:2] != (B, T):
            raise ValueError(f"jaxmoe/parallel/context.py: batch field {k!r} has shape {v.shape}; context "
                             f"parallelism permutes [batch, seq_len] = [{B}, {T}] fields only")
        out[k] = v[:, perm]
    out["token_index"] = np.broadcast_to(perm, (B, T)).copy()
    return out


def unpermute(x, cp: int, axis: int = 1):
    """Inverse of the load-balanced order along `axis` (host or device arrays)."""
    inv = np.argsort(balance_permutation(x.shape[axis], cp))
    return jnp.take(x, inv, axis=axis) if isinstance(x, jax.Array) else np.take(x, inv, axis=axis)


def context_attention(attention: Callable, q, k, v, segment_ids, token_index, sharding: Sharding):
    """Exact attention of q [B, T, Nq, D] over k/v [B, T, Nkv, D] with T split over `sequence`.

    `attention` is an ops attention (reference or Pallas) with the usual keyword arguments. segment_ids and
    token_index are [B, T] in the same (possibly permuted) order as q; token_index None = natural order."""
    B, T = q.shape[:2]
    if token_index is None:
        token_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    cp = sharding.mesh.shape["sequence"]  # 1: a Pallas kernel run per device (Sharding.kernel)
    q_spec = sharding.spec(("batch", "length_attn", "heads", "head_dim"))
    kv_spec = sharding.spec(("batch", "length_attn", "kv_heads", "head_dim"))
    tok_spec = sharding.spec(("batch", "length_attn"))

    def local(q, k, v, seg, idx):
        gather = lambda x: jax.lax.all_gather(x, "sequence", axis=1, tiled=True) if cp > 1 else x
        return attention(q, gather(k), gather(v), q_segment_ids=seg, kv_segment_ids=gather(seg), q_index=idx,
                         kv_index=gather(idx), causal=True)

    return sharding.shard_map(local, (q_spec, kv_spec, kv_spec, tok_spec, tok_spec), q_spec)(
        q, k, v, segment_ids, token_index)
