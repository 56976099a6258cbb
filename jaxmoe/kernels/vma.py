"""Kernels inside shard_map with check_vma (the train step's manual replica region, parallel/manual.py): which
manual mesh axes values vary over, so that pallas_call outputs, scan carries and custom-VJP cotangents carry the
types jax 0.10 checks."""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl


def varying(*xs) -> frozenset:
    """The manual axes any of xs varies over (empty outside shard_map)."""
    return frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs if x is not None))


def to_varying(x, axes):
    """x cast to vary over `axes` as well."""
    missing = tuple(sorted(frozenset(axes) - varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def pallas_call(kernel, *, out_shape, **kwargs):
    """pl.pallas_call whose outputs vary over the manual axes its operands vary over (jax 0.10 needs that on every
    out_shape under check_vma); operands are first cast to the common set (a kernel mixes them freely)."""
    def call(*args):
        axes = varying(*args)
        if not axes:
            return pl.pallas_call(kernel, out_shape=out_shape, **kwargs)(*args)
        mat = jax.sharding.ManualAxisType(varying=axes)
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape)
        return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*[to_varying(a, axes) for a in args])

    return call


def like(ct, primal):
    """A custom VJP's cotangent of `primal` with primal's manual-axis type: summed over the manual axes it varies
    over and the primal does not (the gradient of a replicated operand is the sum of the per-device ones)."""
    if ct is None or primal is None:
        return ct
    extra = tuple(sorted(varying(ct) - varying(primal)))
    return jax.lax.psum(ct, extra) if extra else ct
