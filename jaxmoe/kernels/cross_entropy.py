"""Fused LM-head + cross entropy that never materialises the [N, V] logits.

    logits = h @ w^T (f32);  lse = logsumexp(logits);  nll = lse - logits[label]   (label < 0: nll 0)

The forward walks vocab chunks per token block with an online logsumexp; the custom VJP recomputes
each [block_tokens, block_vocab] logit chunk and turns it straight into dh and dw contributions, so
the largest temporary is one chunk. With `axis_name` (inside shard_map) w is this device's vocab
shard; per-token (max, sum-exp, target logit) are combined with pmax/psum so every device gets the
global nll/lse, and dh is psum'd over the axis while each device keeps the dw of its own shard.
`valid_vocab` masks Megatron-style padded vocab rows (global id >= valid_vocab) out of the softmax.
This path is plain XLA (lax.map/scan of matmuls); `interpret` is accepted so the kernel switch can
call every op with one signature.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.kernels.vma import like, to_varying, varying

DEFAULT_BLOCK_TOKENS = 4096
DEFAULT_BLOCK_VOCAB = 8192


def linear_cross_entropy_reference(h, w, labels, valid_vocab=None, axis_name=None):
    """Full f32 logits (HIGHEST precision); returns (nll [N] f32, lse [N] f32).

    With `axis_name` (inside shard_map, w = this device's vocab shard) it holds the full logits of
    the local shard and combines max / sum-exp / target logit over the axis, Megatron style.
    """
    logits = jnp.dot(h, w.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    offset = jax.lax.axis_index(axis_name) * w.shape[0] if axis_name else 0
    ids = offset + jnp.arange(w.shape[0])
    if valid_vocab is not None:
        logits = jnp.where(ids < valid_vocab, logits, -jnp.inf)
    if axis_name is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    else:
        m = jax.lax.pmax(jax.lax.stop_gradient(logits).max(axis=-1), axis_name)
        lse = m + jnp.log(jax.lax.psum(jnp.exp(logits - m[:, None]).sum(axis=-1), axis_name))
        target = jax.lax.psum(jnp.where(ids[None, :] == labels[:, None], logits, 0.0).sum(-1),
                              axis_name)
    return jnp.where(labels >= 0, lse - target, 0.0), lse


def linear_cross_entropy_flops(n, h, v):
    """Forward (logits) and backward (dh, dw) matmul FLOPs; the backward also recomputes logits."""
    return {"fwd": 2 * n * h * v, "fwd_bwd": 2 * n * h * v * 4}


def _precision(dtype):
    # fp32 inputs must not silently drop to TF32 on GPU; bf16 inputs are exact in any case.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


class _Layout:
    """Padded, blocked views of the inputs plus the vocab-id bookkeeping of this device's shard."""

    def __init__(self, h, w, labels, bt, bv, axis_name, valid_vocab):
        n, hid = h.shape
        v_local = w.shape[0]
        self.n, self.nt, self.nv, self.bt, self.bv = n, -(-n // bt), -(-v_local // bv), bt, bv
        self.h = jnp.pad(h, ((0, self.nt * bt - n), (0, 0))).reshape(self.nt, bt, hid)
        self.labels = jnp.pad(labels, (0, self.nt * bt - n), constant_values=-1).reshape(self.nt, bt)
        self.w = jnp.pad(w, ((0, self.nv * bv - v_local), (0, 0))).reshape(self.nv, bv, hid)
        self.offset = jax.lax.axis_index(axis_name) * v_local if axis_name else 0
        self.v_local = v_local
        self.valid_vocab = valid_vocab
        self.precision = _precision(h.dtype)
        self.axis_name = axis_name
        # scan carries start invariant but mix in h and this shard's w: they vary over what those vary over
        self.varying = varying(h, w) | set((axis_name,) if isinstance(axis_name, str) else axis_name or ())

    def vary(self, x):
        return to_varying(x, self.varying)

    def chunk_logits(self, h_t, c):
        """Logits of token block h_t against vocab chunk c: masked to -inf where the id is padding."""
        w_c = self.w[c]
        logits = jnp.dot(h_t, w_c.T, precision=self.precision, preferred_element_type=jnp.float32)
        local = c * self.bv + jnp.arange(self.bv)
        ok = local < self.v_local
        if self.valid_vocab is not None:
            ok &= self.offset + local < self.valid_vocab
        # Padding rows get id -1 so no label can pick them (a padded local row would otherwise
        # alias the next shard's first ids).
        ids = jnp.where(ok, self.offset + local, -1)
        return jnp.where(ok[None, :], logits, -jnp.inf), ids, w_c


def _safe(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _forward(h, w, labels, bt, bv, axis_name, valid_vocab):
    lay = _Layout(h, w, labels, bt, bv, axis_name, valid_vocab)

    def token_block(args):
        h_t, lab_t = args

        def vocab_chunk(carry, c):
            m, s, tgt = carry
            logits, ids, _ = lay.chunk_logits(h_t, c)
            m_new = jnp.maximum(m, logits.max(axis=1))
            s = s * jnp.exp(m - _safe(m_new)) + jnp.exp(logits - _safe(m_new)[:, None]).sum(axis=1)
            tgt = tgt + jnp.where(ids[None, :] == lab_t[:, None], logits, 0.0).sum(axis=1)
            return (m_new, s, tgt), None

        init = tuple(lay.vary(jnp.full((bt,), x, jnp.float32)) for x in (-jnp.inf, 0.0, 0.0))
        return jax.lax.scan(vocab_chunk, init, jnp.arange(lay.nv))[0]

    m, s, tgt = (x.reshape(-1)[:lay.n] for x in jax.lax.map(token_block, (lay.h, lay.labels)))
    if axis_name:
        m_all = jax.lax.pmax(m, axis_name)
        s = jax.lax.psum(s * jnp.exp(m - _safe(m_all)), axis_name)
        tgt = jax.lax.psum(tgt, axis_name)
        m = m_all
    lse = _safe(m) + jnp.log(s)
    return jnp.where(labels >= 0, lse - tgt, 0.0), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _lce(h, w, labels, bt, bv, axis_name, valid_vocab):
    return _forward(h, w, labels, bt, bv, axis_name, valid_vocab)


def _lce_fwd(h, w, labels, bt, bv, axis_name, valid_vocab):
    nll, lse = _forward(h, w, labels, bt, bv, axis_name, valid_vocab)
    return (nll, lse), (h, w, labels, lse)


def _lce_bwd(bt, bv, axis_name, valid_vocab, res, cotangents):
    h, w, labels, lse = res
    dnll, dlse = cotangents
    lay = _Layout(h, w, labels, bt, bv, axis_name, valid_vocab)
    pad = lay.nt * bt - lay.n
    # d logits = softmax * (dnll + dlse) - onehot(label) * dnll   (ignored tokens: dnll counts 0)
    b = jnp.where(labels >= 0, dnll, 0.0).astype(jnp.float32)
    a = b + dlse.astype(jnp.float32)
    blocked = lambda x: jnp.pad(x, (0, pad)).reshape(lay.nt, bt)
    lse_b, a_b, b_b = blocked(lse), blocked(a), blocked(b)

    def vocab_chunk(dh, c):
        def token_block(dw_c, t):
            logits, ids, w_c = lay.chunk_logits(lay.h[t], c)
            p = jnp.exp(logits - lse_b[t][:, None])
            g = p * a_b[t][:, None] - jnp.where(ids[None, :] == lay.labels[t][:, None],
                                                b_b[t][:, None], 0.0)
            g = g.astype(h.dtype)
            dh_t = jnp.dot(g, w_c, precision=lay.precision, preferred_element_type=jnp.float32)
            dw_c = dw_c + jnp.dot(g.T, lay.h[t], precision=lay.precision,
                                  preferred_element_type=jnp.float32)
            return dw_c, dh_t

        dw_c, dh_c = jax.lax.scan(token_block, lay.vary(jnp.zeros((bv, h.shape[1]), jnp.float32)),
                                  jnp.arange(lay.nt))
        return dh + dh_c, dw_c.astype(w.dtype)

    dh, dw = jax.lax.scan(vocab_chunk, lay.vary(jnp.zeros(lay.h.shape, jnp.float32)),
                          jnp.arange(lay.nv))
    dh = dh.reshape(-1, h.shape[1])[:lay.n]
    if axis_name:
        dh = jax.lax.psum(dh, axis_name)  # every vocab shard contributes to the replicated h
    dw = dw.reshape(-1, w.shape[1])[:w.shape[0]]
    return like(dh.astype(h.dtype), h), like(dw, w), None


_lce.defvjp(_lce_fwd, _lce_bwd)


def linear_cross_entropy(h, w, labels, *, block_tokens=DEFAULT_BLOCK_TOKENS,
                         block_vocab=DEFAULT_BLOCK_VOCAB, axis_name=None, valid_vocab=None,
                         interpret=None):
    """(nll [N] f32, lse [N] f32) of h [N, H] against w [V(/tp), H] without [N, V] logits."""
    del interpret  # plain XLA path; see module doc
    if h.ndim != 2 or w.ndim != 2 or labels.shape != h.shape[:1] or w.shape[1] != h.shape[1]:
        raise ValueError(
            f"jaxmoe/kernels/cross_entropy.py: expected h [N, H], w [V, H], labels [N]; got "
            f"{h.shape}, {w.shape}, {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"jaxmoe/kernels/cross_entropy.py: labels must be int32, got {labels.dtype}.")
    if block_tokens < 1 or block_vocab < 1:
        raise ValueError(f"jaxmoe/kernels/cross_entropy.py: block_tokens={block_tokens} and "
                         f"block_vocab={block_vocab} must be positive.")
    bt = min(int(block_tokens), h.shape[0])
    bv = min(int(block_vocab), w.shape[0])
    return _lce(h, w.astype(h.dtype), labels.astype(jnp.int32), bt, bv, axis_name,
                None if valid_vocab is None else int(valid_vocab))
