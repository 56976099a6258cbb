"""Gradients reduced once per step: the micro-batch loop runs inside a shard_map that is manual over the
replica axes (`data`, `expert`; `stage` too, size 1 until the pipeline exists). Used when tensor = sequence
= 1 (see manual_axes_for); other meshes take the GSPMD path of train/step.py.

Under plain GSPMD the accumulated gradient has the parameters' (data-replicated) layout, so XLA reduces
every micro-batch's gradient across data ranks inside the accumulation loop. Here each device differentiates
its own local objective with respect to parameters cast to *varying* (jax.lax.pcast), so no collective is
inserted for them; it accumulates its partial gradient locally over the micro-batches and reduces once at the
end: a reduce-scatter over the replica axes straight into the sharded-optimizer (ZeRO-1) layout, and a sum
over the replica axes a parameter is neither split nor ZeRO-sharded on. Megatron's
distributed optimizer does the same (one reduce-scatter per step, after the last micro-batch).

The objective of each device is its share of the global one (the sum over devices is the step's loss), so
terms every replica computes identically (the aux loss, from counts summed over the micro-batch) are divided
by the number of token replicas. Row order: micro-batch m holds the global rows m*G/M + r exactly as the
single-device step (train/step.py split_micro); `to_replica_order` reorders the rows so that each device's
contiguous block holds its rows of every micro-batch.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from jaxmoe.sharding import mesh_axes_of, spec_axes, strip_axes, varying_axes, zero_spec_all

REPLICA_AXES = ("data", "stage", "expert")  # axes made manual in the train step (when > 1)
TOKEN_REPLICAS = ("data", "expert")  # axes that split the tokens of a micro-batch across replicas


def manual_axes_for(mesh) -> tuple[str, ...]:
    """The replica axes (all three, size-1 ones included, so the MoE dispatch's collectives stay bound) when
    some replica axis splits the batch and no automatic axis needs a nested shard_map; else () and the step
    uses the GSPMD path (gradients then reduced per micro-batch: tensor / context parallel meshes). jax 0.10
    fails to differentiate a scan over a shard_map nested in manual axes (Shardy rejects the residual
    shardings, or the scan's partial evaluation loses the manual context), which the MoE dispatch and
    context attention would need under tp / cp. Pipeline meshes (pp > 1) run parallel/pipeline.py, which
    reduces once per step by construction."""
    if any(mesh.shape[a] > 1 for a in ("tensor", "sequence", "stage")) or \
            all(mesh.shape[a] == 1 for a in REPLICA_AXES):
        return ()
    return REPLICA_AXES


def restrict(spec: P, keep) -> P:
    """Only the mesh axes in `keep` (the manual part of a sharding)."""
    return strip_axes(spec, spec_axes(spec) - set(keep))


def grad_plan(spec: P, shape, mesh, manual):
    """(out_spec restricted to manual axes, scatter dim or None, manual axes to reduce-scatter over, axes to
    psum) for one gradient: a reduce-scatter straight into the sharded-optimizer layout (zero_spec_all,
    whose replica axes come in mesh order, the manual ones first), a sum over the other replica axes."""
    red = [a for a in manual if a not in spec_axes(spec)]
    zero = zero_spec_all(spec, shape, dict(mesh.shape))
    for d, (old, new) in enumerate(zip(list(spec) + [None] * len(shape), zero)):
        scat = tuple(a for a in mesh_axes_of(new) if a in manual)
        if old is None and scat:
            return restrict(zero, manual), d, scat, tuple(a for a in red if a not in scat)
    return restrict(spec, manual), None, (), tuple(red)


def to_replica_order(batch: dict, num_micro: int) -> dict:
    """Global rows [G] -> order (r, m) so that micro-batch m = rows m*G/M + r and a contiguous block of rows
    holds whole r ranges (each data/expert replica's rows of every micro-batch)."""
    def one(x):
        G = x.shape[0]
        return x.reshape((num_micro, G // num_micro) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
    return jax.tree.map(one, batch)


def local_micro(batch: dict, num_micro: int) -> dict:
    """A replica's rows (in to_replica_order) -> [num_micro, rows per micro-batch, ...]."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1),
                        batch)


def _varying(x, manual):
    missing = tuple(a for a in manual if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _reduce(x, manual):
    red = tuple(a for a in manual if a in varying_axes(x))
    return jax.lax.psum(x, red) if red else x


def manual_grads(local_fn: Callable, mesh, manual, params, param_specs, state, state_specs, batch, batch_spec,
                 frozen=None, frozen_specs=None, scalars=()):
    """Run local_fn(params, state, local_batch, frozen, scalars) -> (summed local grads [f32], stats) on every
    device of the manual `mesh` axes; return (grads reduced once, in the ZeRO layout; stats summed over
    replicas). `param_specs` etc. are the full (auto + manual) PartitionSpecs of the compute layout."""
    plans = jax.tree.map(lambda s, p: grad_plan(s, p.shape, mesh, manual), param_specs, params,
                         is_leaf=lambda s: isinstance(s, P))
    is_plan = lambda x: isinstance(x, tuple) and len(x) == 4 and isinstance(x[0], P)
    keep = lambda t: jax.tree.map(lambda s: restrict(s, manual), t, is_leaf=lambda s: isinstance(s, P))
    in_specs = (keep(param_specs), keep(state_specs), restrict(batch_spec, manual),
                None if frozen is None else keep(frozen_specs), P())
    out_specs = (jax.tree.map(lambda pl: pl[0], plans, is_leaf=is_plan), P())

    def body(p, st, b, fr, sc):
        p = jax.tree.map(lambda x: _varying(x, manual), p)  # differentiate without implicit reductions
        b = jax.tree.map(lambda x: _varying(x, manual), b)  # activations vary over every manual axis (scan carries)
        g, stats = local_fn(p, st, b, fr, sc)

        def red(x, plan):
            _, scatter, scat, axes = plan
            if scatter is not None:
                x = jax.lax.psum_scatter(_varying(x, scat), scat, scatter_dimension=scatter, tiled=True)
            axes = tuple(a for a in axes if a in varying_axes(x))
            return jax.lax.psum(x, axes) if axes else x

        g = jax.tree.map(red, g, plans)
        return g, jax.tree.map(lambda x: _reduce(x, manual), stats)

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(manual))(
        params, state, batch, frozen, scalars)
