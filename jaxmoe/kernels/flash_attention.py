"""Flash attention as Pallas kernels for the NVIDIA Triton backend, with a custom VJP.

Semantics are attention_ref.attention_reference's (mask, GQA mapping, out = 0 / lse = -inf on fully
masked rows). Layout and schedule:
- forward: grid (batch, q head, q block); online softmax over the kv blocks of the row's visible
  range, in the exp2 domain with fp32 statistics. K/V are indexed by kv head h // group in the
  BlockSpec, never repeated.
- backward: delta = rowsum(dO * O) - dlse (the lse cotangent enters here, since d lse / d s = p),
  then a dK/dV kernel (grid over kv blocks, loops over the group's q heads and the visible q blocks,
  so dK/dV accumulate in registers with no atomics) and a dQ kernel (grid over q blocks).
- Block skipping: [q tile, kv tile] tables from per-tile min/max of positions and segment ids
  (any order, so ring-attention chunks and packed documents both skip) give each program a loop
  range [lo, hi) over the tiles that may be visible, and inside it [plo, phi) over the tiles that
  need the element mask; fully visible tiles (e.g. below the causal diagonal) run without it.
- Lengths that are not a block multiple are zero-padded; padded keys and queries are masked out.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmoe.kernels.attention_ref import check_attention_inputs, default_index
from jaxmoe.kernels.vma import like, pallas_call

__all__ = ["flash_attention", "TUNING_DEFAULTS"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

# Keys accepted in **tuning. Block sizes are powers of two >= 16 (Triton dot tiles); they shrink
# to the padded sequence length for short inputs.
TUNING_DEFAULTS = {
    "num_warps": None,  # forward; None -> 4 for block_q <= 64 else 8
    "num_stages": 2,  # forward software-pipelining depth of the K/V loop
    "bwd_block_q": 64,  # q rows per tile in both backward kernels
    "bwd_block_k": 64,  # kv rows per tile in both backward kernels
    "bwd_num_warps": 4,
    "bwd_num_stages": 2,
}


@dataclasses.dataclass(frozen=True)
class _Config:
    batch: int
    T: int  # true lengths; arrays reaching the kernels are padded to T_pad / S_pad
    S: int
    T_pad: int
    S_pad: int
    group: int  # q heads per kv head
    causal: bool
    scale: float
    has_seg: bool
    has_index: bool
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    bwd_block_q: int
    bwd_block_k: int
    bwd_num_warps: int
    bwd_num_stages: int
    interpret: bool


def _block_size(name, requested, length):
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"jaxmoe/kernels/flash_attention.py: {name}={requested} must be a power of two "
                         ">= 16 (Triton tiles); pass e.g. 64 or 128")
    fit = max(16, 1 << max(0, length - 1).bit_length())  # smallest power of two >= length
    return min(requested, fit)


def _pad_len(x, axis, new_len, mode):
    if x.shape[axis] == new_len:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


# ----------------------------------------------------------------------------------------------
# Visibility ranges


def _block_tables(cfg, aux, bq, bk):
    """Two [B, T_pad/bq, S_pad/bk] bool tables over tile pairs: `vis` is False only where every pair
    is masked (the tile is skipped); `full` is True only where every pair is visible (no mask)."""
    q_pos, kv_pos = aux["q_pos"], aux["kv_pos"]
    B = cfg.batch
    if q_pos is None:
        q_pos = _pad_len(default_index(B, cfg.T), 1, cfg.T_pad, "edge")
        kv_pos = _pad_len(default_index(B, cfg.S), 1, cfg.S_pad, "edge")
    nq, nk = cfg.T_pad // bq, cfg.S_pad // bk
    vis = jnp.ones((B, nq, nk), bool)
    full = jnp.ones((B, nq, nk), bool)
    if cfg.causal:
        qp, kp = q_pos.reshape(B, nq, bq), kv_pos.reshape(B, nk, bk)
        vis &= kp.min(-1)[:, None, :] <= qp.max(-1)[:, :, None]
        full &= kp.max(-1)[:, None, :] <= qp.min(-1)[:, :, None]
    if cfg.has_seg:
        qs, ks = aux["q_seg"].reshape(B, nq, bq), aux["kv_seg"].reshape(B, nk, bk)
        q_lo, q_hi, k_lo, k_hi = qs.min(-1), qs.max(-1), ks.min(-1), ks.max(-1)
        vis &= (k_lo[:, None, :] <= q_hi[:, :, None]) & (k_hi[:, None, :] >= q_lo[:, :, None])
        full &= ((q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :]
                 & (q_lo[:, :, None] == k_lo[:, None, :]))
    # tiles holding padded rows/columns need the mask that hides the padding
    full &= ((jnp.arange(nq) + 1) * bq <= cfg.T)[None, :, None]
    full &= ((jnp.arange(nk) + 1) * bk <= cfg.S)[None, None, :]
    return vis, full


def _ranges(vis, full):
    """Loop bounds along the last axis, int32 each: [lo, hi) spans the visible tiles and
    [plo, phi) inside it the tiles that need the element mask; the rest of [lo, hi) is full."""
    n = vis.shape[-1]

    def first_last(x):
        any_ = x.any(-1)
        first = jnp.argmax(x, axis=-1)
        last1 = n - jnp.argmax(x[..., ::-1], axis=-1)
        return any_, first, last1

    any_vis, lo, hi = first_last(vis)
    lo, hi = jnp.where(any_vis, lo, 0), jnp.where(any_vis, hi, 0)
    j = jnp.arange(n)
    inside = (j >= lo[..., None]) & (j < hi[..., None])
    any_part, plo, phi = first_last(inside & ~full)
    plo, phi = jnp.where(any_part, plo, hi), jnp.where(any_part, phi, hi)
    return tuple(x.astype(jnp.int32) for x in (lo, plo, phi, hi))


def _three_loops(bounds, body, carry):
    """Full tiles [lo, plo), masked tiles [plo, phi), full tiles [phi, hi)."""
    lo, plo, phi, hi = bounds
    carry = lax.fori_loop(lo, plo, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(plo, phi, functools.partial(body, masked=True), carry)
    return lax.fori_loop(phi, hi, functools.partial(body, masked=False), carry)


# ----------------------------------------------------------------------------------------------
# Kernel helpers (traced inside the kernels; only Triton-lowerable ops)


def _mask(cfg, rows, cols, q_pos, kv_pos, q_seg, kv_seg):
    """Element mask [bq, bk] for one tile (all True when nothing is masked; such tiles never run it)."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if cfg.causal:
        mask = both(mask, kv_pos[None, :] <= q_pos[:, None])
    if cfg.has_seg:
        mask = both(mask, q_seg[:, None] == kv_seg[None, :])
    if cfg.S_pad != cfg.S:
        mask = both(mask, (cols < cfg.S)[None, :])
    if cfg.T_pad != cfg.T:
        mask = both(mask, (rows < cfg.T)[:, None])
    shape = (rows.shape[0], cols.shape[0])
    return jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(mask, shape)


def _dot(a, b, contract_a, contract_b):
    # fp32 inputs get IEEE fp32 matmuls (Triton would otherwise use TF32); bf16 uses tensor cores.
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def _split_refs(cfg, refs, n_fixed):
    """Kernel refs are: fixed inputs, [q_seg, kv_seg], [q_pos, kv_pos], lo, plo, phi, hi, outputs."""
    fixed, rest = list(refs[:n_fixed]), list(refs[n_fixed:])
    seg = (rest.pop(0), rest.pop(0)) if cfg.has_seg else (None, None)
    pos = (rest.pop(0), rest.pop(0)) if cfg.has_index else (None, None)
    bounds, outs = tuple(r[...] for r in rest[:4]), rest[4:]
    return fixed, seg, pos, bounds, outs


def _iota(start, n):
    return start + lax.broadcasted_iota(jnp.int32, (n,), 0)


# ----------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(*refs, cfg: _Config):
    (q_ref, k_ref, v_ref), seg, pos, bounds, (o_ref, lse_ref) = _split_refs(cfg, refs, 3)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.num_programs(2) - 1 - pl.program_id(2)  # heaviest (last) causal q blocks launch first
    rows = _iota(i * bq, bq)
    q = q_ref[...]
    qk_scale = cfg.scale * _LOG2E
    q_pos = pos[0][...] if cfg.has_index else rows
    q_seg = seg[0][...] if cfg.has_seg else None

    def body(j, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        sl = pl.ds(start, bk)
        s = _dot(q, k_ref[sl, :], 1, 1) * qk_scale
        if masked:
            cols = _iota(start, bk)
            kv_pos = pos[1][sl] if cfg.has_index else cols
            kv_seg = seg[1][sl] if cfg.has_seg else None
            s = jnp.where(_mask(cfg, rows, cols, q_pos, kv_pos, q_seg, kv_seg), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # a row may still be empty after a masked tile: keep exp2 finite (a full tile makes m finite)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp2(s - m_use[:, None])
        alpha = jnp.exp2(m - m_use)
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[sl, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
        return m_new, l, acc

    D = q.shape[-1]
    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, D), jnp.float32))
    m, l, acc = _three_loops(bounds, body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    m_use = jnp.where(empty, 0.0, m)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_use * _LN2 + jnp.log(l_safe))


def _meta_inputs(cfg, aux, q_spec, kv_spec):
    """Segment/position arrays and their BlockSpecs, in _split_refs order."""
    args, specs = [], []
    if cfg.has_seg:
        args += [aux["q_seg"], aux["kv_seg"]]
        specs += [q_spec, kv_spec]
    if cfg.has_index:
        args += [aux["q_pos"], aux["kv_pos"]]
        specs += [q_spec, kv_spec]
    return args, specs


def _forward(cfg, q, k, v, aux):
    B, T_pad, Nq, D = q.shape
    bq, bk, G = cfg.block_q, cfg.block_k, cfg.group
    nq = T_pad // bq
    bounds = _ranges(*_block_tables(cfg, aux, bq, bk))  # 4 x [B, nq]

    def qi(i):  # reversed launch order, see _fwd_kernel
        return nq - 1 - i

    q_spec = pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, qi(i), h, 0))
    kv_spec = pl.BlockSpec((None, cfg.S_pad, None, D), lambda b, h, i: (b, 0, h // G, 0))
    meta_args, meta_specs = _meta_inputs(
        cfg, aux, pl.BlockSpec((None, bq), lambda b, h, i: (b, qi(i))),
        pl.BlockSpec((None, cfg.S_pad), lambda b, h, i: (b, 0)))
    range_spec = pl.BlockSpec((None, None), lambda b, h, i: (b, qi(i)))
    out, lse = pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(B, Nq, nq),
        in_specs=[q_spec, kv_spec, kv_spec, *meta_specs, *[range_spec] * 4],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, qi(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, Nq, T_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(q, k, v, *meta_args, *bounds)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Backward


def _dkdv_kernel(*refs, cfg: _Config):
    ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg, pos, bounds,
     (dk_ref, dv_ref)) = _split_refs(cfg, refs, 6)
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    j = pl.program_id(2)
    cols = _iota(j * bk, bk)
    k = k_ref[...]
    v = v_ref[...]
    kv_pos = pos[1][...] if cfg.has_index else cols
    kv_seg = seg[1][...] if cfg.has_seg else None
    qk_scale = cfg.scale * _LOG2E

    def q_block(i, carry, masked, g):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        sl = pl.ds(start, bq)
        q = q_ref[sl, g, :]
        do = do_ref[sl, g, :]
        lse2 = lse_ref[g, sl] * _LOG2E
        delta = delta_ref[g, sl]
        p = jnp.exp2(_dot(q, k, 1, 1) * qk_scale - lse2[:, None])
        if masked:  # after exp2: rows with lse = -inf are all masked, their inf is dropped here
            rows = _iota(start, bq)
            q_pos = pos[0][sl] if cfg.has_index else rows
            q_seg = seg[0][sl] if cfg.has_seg else None
            p = jnp.where(_mask(cfg, rows, cols, q_pos, kv_pos, q_seg, kv_seg), p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
        return dk, dv

    def head(g, carry):
        return _three_loops(bounds, functools.partial(q_block, g=g), carry)

    D = k.shape[-1]
    zeros = jnp.zeros((bk, D), jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Config):
    ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg, pos, bounds,
     (dq_ref,)) = _split_refs(cfg, refs, 6)
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    i = pl.num_programs(2) - 1 - pl.program_id(2)
    rows = _iota(i * bq, bq)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * _LOG2E
    delta = delta_ref[...]
    q_pos = pos[0][...] if cfg.has_index else rows
    q_seg = seg[0][...] if cfg.has_seg else None
    qk_scale = cfg.scale * _LOG2E

    def body(j, dq, masked):
        start = pl.multiple_of(j * bk, bk)
        sl = pl.ds(start, bk)
        k = k_ref[sl, :]
        p = jnp.exp2(_dot(q, k, 1, 1) * qk_scale - lse2[:, None])
        if masked:
            cols = _iota(start, bk)
            kv_pos = pos[1][sl] if cfg.has_index else cols
            kv_seg = seg[1][sl] if cfg.has_seg else None
            p = jnp.where(_mask(cfg, rows, cols, q_pos, kv_pos, q_seg, kv_seg), p, 0.0)
        ds = p * (_dot(do, v_ref[sl, :], 1, 1) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = _three_loops(bounds, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg, q, k, v, aux, out, lse, dout, dlse):
    B, T_pad, Nq, D = q.shape
    Nkv = k.shape[2]
    bq, bk, G = cfg.bwd_block_q, cfg.bwd_block_k, cfg.group
    nq, nk = T_pad // bq, cfg.S_pad // bk
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1)) - dlse  # [B, Nq, T_pad]
    vis, full = _block_tables(cfg, aux, bq, bk)
    params = plgpu.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)

    # dK, dV: grid (batch, kv head, kv block); the q-side refs hold the group's G heads.
    q_bounds = _ranges(jnp.swapaxes(vis, 1, 2), jnp.swapaxes(full, 1, 2))  # 4 x [B, nk]
    q_group = pl.BlockSpec((None, T_pad, G, D), lambda b, h, j: (b, 0, h, 0))
    row_group = pl.BlockSpec((None, G, T_pad), lambda b, h, j: (b, h, 0))
    kv_blk = pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0))
    meta_args, meta_specs = _meta_inputs(
        cfg, aux, pl.BlockSpec((None, T_pad), lambda b, h, j: (b, 0)),
        pl.BlockSpec((None, bk), lambda b, h, j: (b, j)))
    range_spec = pl.BlockSpec((None, None), lambda b, h, j: (b, j))
    dk, dv = pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(B, Nkv, nk),
        in_specs=[q_group, kv_blk, kv_blk, q_group, row_group, row_group, *meta_specs,
                  *[range_spec] * 4],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(q, k, v, dout, lse, delta, *meta_args, *q_bounds)

    # dQ: grid (batch, q head, q block), heaviest causal blocks first.
    kv_bounds = _ranges(vis, full)  # 4 x [B, nq]

    def qi(i):
        return nq - 1 - i

    q_blk = pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, qi(i), h, 0))
    kv_full = pl.BlockSpec((None, cfg.S_pad, None, D), lambda b, h, i: (b, 0, h // G, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, qi(i)))
    meta_args, meta_specs = _meta_inputs(
        cfg, aux, pl.BlockSpec((None, bq), lambda b, h, i: (b, qi(i))),
        pl.BlockSpec((None, cfg.S_pad), lambda b, h, i: (b, 0)))
    range_spec = pl.BlockSpec((None, None), lambda b, h, i: (b, qi(i)))
    dq = pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, Nq, nq),
        in_specs=[q_blk, kv_full, kv_full, q_blk, row_blk, row_blk, *meta_specs, *[range_spec] * 4],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q, k, v, dout, lse, delta, *meta_args, *kv_bounds)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom VJP over padded arrays; aux holds the (padded) integer metadata, which has no gradient.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, aux):
    return _forward(cfg, q, k, v, aux)


def _flash_fwd(cfg, q, k, v, aux):
    out, lse = _forward(cfg, q, k, v, aux)
    return (out, lse), (q, k, v, aux, out, lse)


def _flash_bwd(cfg, res, cotangents):
    q, k, v, aux, out, lse = res
    dout, dlse = cotangents
    dq, dk, dv = _backward(cfg, q, k, v, aux, out, lse, dout, dlse)
    return like(dq, q), like(dk, k), like(dv, v), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_index=None, kv_index=None,
                    causal=True, sm_scale=None, return_lse=False, block_q=128, block_k=128, interpret=None,
                    **tuning):
    """Flash attention; same arguments and results as attention_reference.

    block_q / block_k tile the forward pass; **tuning takes the keys of TUNING_DEFAULTS (backward
    tiles, num_warps, num_stages). interpret=None runs the Pallas interpreter on the CPU backend
    and compiles with Triton on GPU. sm_scale must be a Python number (it is baked into the kernel).
    """
    B, T, S, Nq, Nkv, D, scale = check_attention_inputs(
        "flash_attention.py:flash_attention", q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index,
        sm_scale)
    unknown = set(tuning) - set(TUNING_DEFAULTS)
    if unknown:
        raise ValueError(f"jaxmoe/kernels/flash_attention.py: unknown tuning option(s) {sorted(unknown)}; "
                         f"accepted: {sorted(TUNING_DEFAULTS)}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"jaxmoe/kernels/flash_attention.py: head_dim {D} must be a power of two >= 16 "
                         "(Triton tiles); use attention_reference for other sizes")
    opts = {**TUNING_DEFAULTS, **tuning}
    bq = _block_size("block_q", block_q, T)
    bk = _block_size("block_k", block_k, S)
    bwd_bq = _block_size("bwd_block_q", opts["bwd_block_q"], T)
    bwd_bk = _block_size("bwd_block_k", opts["bwd_block_k"], S)
    T_pad = -(-T // max(bq, bwd_bq)) * max(bq, bwd_bq)  # powers of two: the max is a common multiple
    S_pad = -(-S // max(bk, bwd_bk)) * max(bk, bwd_bk)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    cfg = _Config(
        batch=B, T=T, S=S, T_pad=T_pad, S_pad=S_pad, group=Nq // Nkv, causal=bool(causal), scale=scale,
        has_seg=q_segment_ids is not None, has_index=q_index is not None, block_q=bq, block_k=bk,
        num_warps=opts["num_warps"] or (4 if bq <= 64 else 8), num_stages=opts["num_stages"],
        bwd_block_q=bwd_bq, bwd_block_k=bwd_bk, bwd_num_warps=opts["bwd_num_warps"],
        bwd_num_stages=opts["bwd_num_stages"], interpret=bool(interpret))

    def meta(x, length):
        # Edge padding repeats the last value, so per-block min/max (block skipping) stay tight.
        return None if x is None else _pad_len(x.astype(jnp.int32), 1, length, "edge")

    aux = {"q_seg": meta(q_segment_ids, T_pad), "kv_seg": meta(kv_segment_ids, S_pad),
           "q_pos": meta(q_index, T_pad), "kv_pos": meta(kv_index, S_pad)}
    qp = _pad_len(q, 1, T_pad, "constant")
    kp = _pad_len(k, 1, S_pad, "constant")
    vp = _pad_len(v, 1, S_pad, "constant")
    out, lse = _flash(cfg, qp, kp, vp, aux)
    out, lse = out[:, :T], lse[:, :, :T]
    return (out, lse) if return_lse else out
