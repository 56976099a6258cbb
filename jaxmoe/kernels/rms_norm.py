"""RMSNorm (HF Glm4MoeRMSNorm numerics), optionally fused with the residual add: Pallas (Triton).

    s = x + residual                     (in x.dtype, exactly the model's own residual add)
    h = s.astype(f32);  y = h * rsqrt(mean(h^2, -1) + eps)
    out = weight * y.astype(x.dtype)     (HF multiplies by the weight after casting back)

With a residual the call returns (out, s): s is the new residual stream. The kernels work on
blocks of rows with the hidden size padded to a power of two (a Triton requirement) and masked
loads/stores; the backward recomputes y from the saved per-row rstd and writes per-block partial
weight gradients that are summed outside the kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmoe.kernels.gmm import resolve_interpret
from jaxmoe.kernels.vma import like, pallas_call

DEFAULT_BLOCK_ROWS = 4


def rms_norm_reference(x, weight, eps, residual=None):
    """HF Glm4MoeRMSNorm; with `residual`, returns (normed, x + residual) like a fused add+norm."""
    s = x if residual is None else (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)
    h = s.astype(jnp.float32)
    y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    out = weight * y.astype(x.dtype)
    return out if residual is None else (out, s)


def _next_pow2(n):
    return 1 << (int(n) - 1).bit_length()


def _tile(ref, i, br, hp):
    return ref.at[pl.ds(i * br, br), pl.ds(0, hp)]


def _masks(i, m, h, br, hp):
    row_ok = i * br + jax.lax.iota(jnp.int32, br) < m
    col_ok = jax.lax.iota(jnp.int32, hp) < h
    return row_ok[:, None] & col_ok[None, :], row_ok, col_ok


def _load_sum(x_ref, res_ref, i, mask, br, hp):
    """The pre-norm stream s = x (+ residual) rounded to x.dtype, as f32 (masked lanes 0)."""
    x = plgpu.load(_tile(x_ref, i, br, hp), mask=mask, other=0)
    if res_ref is None:
        return x.astype(jnp.float32), x
    r = plgpu.load(_tile(res_ref, i, br, hp), mask=mask, other=0)
    s = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(x.dtype)
    return s.astype(jnp.float32), s


def _fwd_kernel(*refs, m, h, br, hp, eps, has_res):
    if has_res:
        x_ref, res_ref, w_ref, out_ref, s_ref, rstd_ref = refs
    else:
        (x_ref, w_ref, out_ref, rstd_ref), res_ref, s_ref = refs, None, None
    i = pl.program_id(0)
    mask, row_ok, col_ok = _masks(i, m, h, br, hp)
    hf, s = _load_sum(x_ref, res_ref, i, mask, br, hp)
    rstd = jax.lax.rsqrt(jnp.sum(hf * hf, axis=1) / h + eps)
    w = plgpu.load(w_ref.at[pl.ds(0, hp)], mask=col_ok, other=0)
    y = (hf * rstd[:, None]).astype(s.dtype)
    plgpu.store(_tile(out_ref, i, br, hp), (w[None, :] * y).astype(out_ref.dtype), mask=mask)
    if has_res:
        plgpu.store(_tile(s_ref, i, br, hp), s.astype(s_ref.dtype), mask=mask)
    plgpu.store(rstd_ref.at[pl.ds(i * br, br)], rstd, mask=row_ok)


def _bwd_kernel(*refs, m, h, br, hp, has_res):
    if has_res:
        x_ref, res_ref, w_ref, rstd_ref, dout_ref, ds_ref, dx_ref, dw_ref = refs
    else:
        (x_ref, w_ref, rstd_ref, dout_ref, dx_ref, dw_ref), res_ref, ds_ref = refs, None, None
    i = pl.program_id(0)
    mask, row_ok, col_ok = _masks(i, m, h, br, hp)
    hf, s = _load_sum(x_ref, res_ref, i, mask, br, hp)
    rstd = plgpu.load(rstd_ref.at[pl.ds(i * br, br)], mask=row_ok, other=0)[:, None]
    w = plgpu.load(w_ref.at[pl.ds(0, hp)], mask=col_ok, other=0).astype(jnp.float32)
    dout = plgpu.load(_tile(dout_ref, i, br, hp), mask=mask, other=0).astype(jnp.float32)
    y = hf * rstd
    # out = w * round(y): the weight sees the rounded y; the cast itself passes gradients through.
    dw = jnp.sum(dout * y.astype(s.dtype).astype(jnp.float32), axis=0)
    dy = dout * w[None, :]
    dh = rstd * (dy - y * (jnp.sum(dy * y, axis=1, keepdims=True) / h))
    if has_res:
        dh = dh + plgpu.load(_tile(ds_ref, i, br, hp), mask=mask, other=0).astype(jnp.float32)
    plgpu.store(_tile(dx_ref, i, br, hp), dh.astype(dx_ref.dtype), mask=mask)
    plgpu.store(dw_ref.at[i, pl.ds(0, hp)], dw, mask=col_ok)


def _call(kernel, args, out_shapes, m, br, interpret, name):
    return pallas_call(
        kernel, out_shape=out_shapes, grid=(pl.cdiv(m, br),),
        in_specs=[pl.no_block_spec] * len(args), out_specs=[pl.no_block_spec] * len(out_shapes),
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
        interpret=interpret, name=name)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rms(x, residual, weight, eps, br, interpret):
    return _rms_fwd(x, residual, weight, eps, br, interpret)[0]


def _rms_fwd(x, residual, weight, eps, br, interpret):
    m, h = x.shape
    hp = _next_pow2(h)
    has_res = residual is not None
    out_dtype = jnp.result_type(weight.dtype, x.dtype)
    shapes = [jax.ShapeDtypeStruct((m, h), out_dtype)]
    if has_res:
        shapes.append(jax.ShapeDtypeStruct((m, h), x.dtype))
    shapes.append(jax.ShapeDtypeStruct((m,), jnp.float32))
    args = (x, residual, weight) if has_res else (x, weight)
    kernel = functools.partial(_fwd_kernel, m=m, h=h, br=br, hp=hp, eps=eps, has_res=has_res)
    *outs, rstd = _call(kernel, args, shapes, m, br, interpret, "jaxmoe_rms_norm_fwd")
    result = tuple(outs) if has_res else outs[0]
    return result, (x, residual, weight, rstd)


def _rms_bwd(eps, br, interpret, res, cotangent):
    x, residual, weight, rstd = res
    m, h = x.shape
    has_res = residual is not None
    dout, ds = cotangent if has_res else (cotangent, None)
    nb = pl.cdiv(m, br)
    args = (x, residual, weight, rstd, dout, ds) if has_res else (x, weight, rstd, dout)
    kernel = functools.partial(_bwd_kernel, m=m, h=h, br=br, hp=_next_pow2(h), has_res=has_res)
    shapes = [jax.ShapeDtypeStruct((m, h), x.dtype), jax.ShapeDtypeStruct((nb, h), jnp.float32)]
    dx, dw_parts = _call(kernel, args, shapes, m, br, interpret, "jaxmoe_rms_norm_bwd")
    dw = jnp.sum(dw_parts, axis=0).astype(weight.dtype)
    dres = dx.astype(residual.dtype) if has_res else None
    return like(dx, x), like(dres, residual), like(dw, weight)


_rms.defvjp(_rms_fwd, _rms_bwd)


def rms_norm(x, weight, eps, *, residual=None, block_rows=DEFAULT_BLOCK_ROWS, interpret=None):
    """Pallas RMSNorm over the last axis of x [..., H]; returns y, or (y, x + residual)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"jaxmoe/kernels/rms_norm.py: weight shape {weight.shape} must be "
                         f"({x.shape[-1]},), the last axis of x {x.shape}.")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"jaxmoe/kernels/rms_norm.py: residual shape {residual.shape} must equal "
                         f"x shape {x.shape}.")
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"jaxmoe/kernels/rms_norm.py: block_rows={block_rows} must be a power of "
                         "two (Triton blocks are powers of two).")
    lead = x.shape[:-1]
    flat = lambda t: None if t is None else t.reshape(-1, x.shape[-1])
    out = _rms(flat(x), flat(residual), weight, float(eps), int(block_rows),
               resolve_interpret(interpret))
    if residual is None:
        return out.reshape(x.shape)
    return out[0].reshape(x.shape), out[1].reshape(lead + x.shape[-1:])
