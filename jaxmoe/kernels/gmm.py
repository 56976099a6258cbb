"""Grouped (ragged) matmul for MoE experts: Pallas kernels for the Triton GPU backend.

    out[r] = lhs[r] @ rhs[g(r)]      rows r sorted by group, g(r) = the group holding row r

`gmm` is the forward (and, with the weight transposed, the input gradient); `tgmm` is the
ragged-contracting weight gradient drhs[g] = lhs_g^T @ dout_g, the case XLA lowers densely.
Rows at or past sum(group_sizes) produce 0 and receive 0 gradient.

Group metadata is built in jnp before the call: per row tile, the first group it touches and how
many groups it spans; the kernel loops over exactly those groups and keeps each group's rows with a
mask, so a tile that straddles a group boundary is computed once per group it touches. Shapes that
are not multiples of the tiles are zero-padded in the wrapper (a no-op for the model's own shapes),
which keeps every in-kernel load in bounds without per-element masks in the K loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmoe.kernels.vma import like, pallas_call

DEFAULT_TILING = (128, 64, 128)


def resolve_interpret(interpret):
    """None means interpret on the CPU backend (no Triton there) and compile on GPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def gmm_flops(m: int, k: int, n: int) -> int:
    """Forward FLOPs of a grouped matmul over m routed rows (each row hits one K x N matrix)."""
    return 2 * m * k * n


def gmm_fwd_bwd_flops(m: int, k: int, n: int) -> int:
    """Forward + both gradients (dlhs via gmm, drhs via tgmm): three matmuls of the same size."""
    return 3 * gmm_flops(m, k, n)


def batchable(fn):
    """fn under vmap by its own rule: jax.lax.ragged_dot's batching rule fails for a vmap inside a vmap (the
    pipeline's stage vmap inside the data-replica vmap) and for unbatched operands. A batch of one (what
    every device sees inside the MoE dispatch's shard_map) runs fn once; larger batches loop. Not
    differentiable by itself (custom_vmap): wrap it in a custom_vjp."""
    @jax.custom_batching.custom_vmap
    def f(*args):
        return fn(*args)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched)]
        if axis_size == 1:
            out = f(*[a[0] for a in args])
            out = jax.tree.map(lambda o: o[None], out)
        else:
            out = jax.lax.map(lambda xs: f(*xs), tuple(args))
        return out, jax.tree.map(lambda _: True, out)

    return f


@functools.lru_cache(maxsize=None)
def _ragged_dot_pair(preferred_element_type):
    dot = lambda lhs, rhs, gs: jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=preferred_element_type)

    def grads(lhs, rhs, gs, ct):  # jax's own transpose rules, without re-running the forward product
        dlhs, = jax.linear_transpose(lambda a: dot(a, rhs, gs), lhs)(ct)
        drhs, = jax.linear_transpose(lambda b: dot(lhs, b, gs), rhs)(ct)
        return dlhs, drhs

    return batchable(dot), batchable(grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ragged_dot(lhs, rhs, group_sizes, preferred_element_type):
    return _ragged_dot_pair(preferred_element_type)[0](lhs, rhs, group_sizes)


def _ragged_dot_fwd(lhs, rhs, group_sizes, preferred_element_type):
    return _ragged_dot(lhs, rhs, group_sizes, preferred_element_type), (lhs, rhs, group_sizes)


def _ragged_dot_bwd(preferred_element_type, res, ct):
    lhs, rhs, group_sizes = res
    dlhs, drhs = _ragged_dot_pair(preferred_element_type)[1](lhs, rhs, group_sizes, ct)
    return dlhs, drhs, None


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def gmm_reference(lhs, rhs, group_sizes, preferred_element_type=None):
    """The plain-XLA reference: jax.lax.ragged_dot (rows past sum(group_sizes) give 0), with jax's own
    gradient, batchable under nested vmaps (see `batchable`)."""
    return _ragged_dot(lhs, rhs, group_sizes, preferred_element_type)


def tgmm_reference(lhs, dout, group_sizes, preferred_element_type=None):
    """drhs[g] = lhs_g^T @ dout_g by a dense one-hot contraction (test reference only: O(G*M*K*N))."""
    m = lhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(m)
    onehot = ((rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])).astype(lhs.dtype)
    out = jnp.einsum("gm,mk,mn->gkn", onehot, lhs, dout, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)


def _check_tiling(tiling):
    if len(tiling) != 3 or any((not isinstance(t, int)) or t < 16 or t & (t - 1) for t in tiling):
        raise ValueError(
            f"jaxmoe/kernels/gmm.py: tiling={tiling!r} must be three powers of two >= 16 "
            "(tm, tk, tn); the Triton backend needs power-of-two blocks and tl.dot needs >= 16.")


def _check_inputs(lhs, rhs, group_sizes, what):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"jaxmoe/kernels/gmm.py {what}: expected lhs [M, K], rhs [G, K, N], group_sizes [G]; got "
            f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}.")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"jaxmoe/kernels/gmm.py {what}: group_sizes must be integer (int32), "
                         f"got {group_sizes.dtype}.")
    if rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"jaxmoe/kernels/gmm.py {what}: rhs has {rhs.shape[0]} groups but "
                         f"group_sizes has {group_sizes.shape[0]}.")


def _round_up(x, m):
    return -(-x // m) * m


def _pad_to(x, shape):
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _group_bounds(group_sizes, m):
    """Row range [start, end) of each group, clamped to the m rows that exist."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts.astype(jnp.int32), ends.astype(jnp.int32)


def make_tile_metadata(group_sizes, m, tm):
    """Per row tile: (first group touching it, number of groups it spans); tiles past the last
    routed row span 0 groups, so their output is written as zeros."""
    starts, ends = _group_bounds(group_sizes, m)
    total = ends[-1]
    tiles = _round_up(m, tm) // tm
    lo = jnp.arange(tiles, dtype=jnp.int32) * tm
    hi = jnp.minimum(lo + tm, total)
    # Group holding row r = number of groups ending at or before r (empty groups are skipped).
    # searchsorted(ends, ., side="right") as [tiles, G] compares (tiny): jnp.searchsorted fails to trace inside
    # shard_map when `ends` varies over manual axes (jax 0.10)
    first = jnp.sum(ends[None, :] <= lo[:, None], axis=1, dtype=jnp.int32)
    last = jnp.sum(ends[None, :] <= (hi - 1)[:, None], axis=1, dtype=jnp.int32)
    count = jnp.where(hi > lo, last - first + 1, 0).astype(jnp.int32)
    return first, count, starts, ends


def _dot(x, w, transpose_w):
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _gmm_kernel(first_ref, count_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
                tm, tk, tn, num_k, transpose_rhs):
    n = pl.program_id(0)
    t = pl.program_id(1)
    rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)

    def one_group(i, out):
        g = first_ref[t] + i
        lo = start_ref[g]
        hi = end_ref[g]

        def k_step(kk, acc):
            x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
            if transpose_rhs:
                w = rhs_ref[g, pl.ds(n * tn, tn), pl.ds(kk * tk, tk)]
            else:
                w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(n * tn, tn)]
            return acc + _dot(x, w, transpose_rhs)

        def compute(out):
            acc = jax.lax.fori_loop(0, num_k, k_step, jnp.zeros((tm, tn), jnp.float32))
            return jnp.where((rows >= lo) & (rows < hi), acc, out)

        # Empty groups inside a tile's span own no rows: skip their matmul.
        return jax.lax.cond(hi > lo, compute, lambda o: o, out)

    out = jax.lax.fori_loop(0, count_ref[t], one_group, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = out.astype(out_ref.dtype)


def _gmm_call(lhs, rhs, group_sizes, tiling, out_dtype, transpose_rhs, interpret):
    """lhs [M, K] x rhs [G, K, N] (or [G, N, K] when transpose_rhs) -> [M, N]."""
    tm, tk, tn = tiling
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad_to(lhs, (mp, kp))
    rhs_p = _pad_to(rhs, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    first, count, starts, ends = make_tile_metadata(group_sizes, m, tm)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_k=kp // tk,
                               transpose_rhs=transpose_rhs)
    out = pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        # n fastest: neighbouring programs share the row tile and the group's weights in L2.
        grid=(np_ // tn, mp // tm),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=pl.BlockSpec((tm, tn), lambda j, i: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4),
        interpret=interpret,
        name="jaxmoe_gmm_t" if transpose_rhs else "jaxmoe_gmm",
    )(first, count, starts, ends, lhs_p, rhs_p)
    return out[:m, :n]


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn):
    n = pl.program_id(0)
    kb = pl.program_id(1)
    g = pl.program_id(2)
    lo = start_ref[g]
    hi = end_ref[g]
    t0 = lo // tm
    num_tiles = jnp.where(hi > lo, (hi + tm - 1) // tm - t0, 0)

    def row_tile(i, acc):
        r0 = (t0 + i) * tm
        rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        keep = (rows >= lo) & (rows < hi)
        x = jnp.where(keep, lhs_ref[pl.ds(r0, tm), pl.ds(kb * tk, tk)], 0)
        d = jnp.where(keep, dout_ref[pl.ds(r0, tm), pl.ds(n * tn, tn)], 0)
        return acc + jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_tiles, row_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, tiling=DEFAULT_TILING, preferred_element_type=None,
         interpret=None):
    """Weight gradient of a grouped matmul: [G, K, N] with out[g] = lhs_g^T @ dout_g (0 if empty)."""
    _check_tiling(tiling)
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"jaxmoe/kernels/gmm.py tgmm: expected lhs [M, K] and dout [M, N] with the "
                         f"same M; got {lhs.shape} and {dout.shape}.")
    tm, tk, tn = tiling
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    starts, ends = _group_bounds(group_sizes, m)
    out = pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), preferred_element_type or lhs.dtype),
        # n, then k, vary fastest: programs running together read the same group's rows.
        grid=(np_ // tn, kp // tk, g),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((None, tk, tn), lambda j, kb, gi: (gi, kb, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4),
        interpret=resolve_interpret(interpret),
        name="jaxmoe_tgmm",
    )(starts, ends, _pad_to(lhs, (mp, kp)), _pad_to(dout.astype(lhs.dtype), (mp, np_)))
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, tiling, out_dtype, interpret):
    return _gmm_call(lhs, rhs, group_sizes, tiling, out_dtype, False, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, out_dtype, interpret):
    return _gmm(lhs, rhs, group_sizes, tiling, out_dtype, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, out_dtype, interpret, res, dout):
    lhs, rhs, group_sizes = res
    # Gradients are computed in the operands' dtype with fp32 accumulation (as Megatron's grouped GEMM).
    dout = dout.astype(lhs.dtype)
    dlhs = _gmm_call(dout, rhs, group_sizes, tiling, lhs.dtype, True, interpret)
    drhs = tgmm(lhs, dout, group_sizes, tiling=tiling, preferred_element_type=rhs.dtype,
                interpret=interpret)
    return like(dlhs, lhs), like(drhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, tiling=DEFAULT_TILING, preferred_element_type=None,
        interpret=None):
    """Grouped matmul lhs [M, K] x rhs [G, K, N] -> [M, N]; rows sorted by group (see module doc)."""
    _check_tiling(tuple(tiling))
    _check_inputs(lhs, rhs, group_sizes, "gmm")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"jaxmoe/kernels/gmm.py gmm: lhs K={lhs.shape[1]} != rhs K={rhs.shape[1]}.")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    return _gmm(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), tuple(tiling),
                out_dtype, resolve_interpret(interpret))
