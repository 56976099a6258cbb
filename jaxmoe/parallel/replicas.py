"""Gradients reduced once per step on GSPMD meshes (tensor / context / pipeline parallel with dp > 1).

Under plain GSPMD the gradient accumulator (a scan carry over micro-batches or pipeline iterations) has the
parameters' data-replicated layout, so XLA all-reduces every micro-batch's contribution inside the loop. Here
the data replicas become an explicit vmapped dimension instead: parameters are broadcast to [D, ...] with that
dimension sharded over `data` (one copy per device, as before), the batch is split per replica, and
`jax.vmap(..., spmd_axis_name="data")` runs the whole micro-batch loop per replica. The cotangent of the
broadcast is then a per-device partial gradient [D, ...], accumulated locally, and summed over D once after
the loop: one reduce-scatter into the sharded-optimizer layout. It is the vmap twin of parallel/manual.py
(which needs tp = cp = 1, see there) and composes with the MoE dispatch and context attention shard_maps
and the pipeline's stage vmap: the model inside runs with replica-mode options (`replica_options`), whose
specs leave `data` to the vmap.

Each replica's objective is its share of the global one; the MoE routing statistics are summed over the
replica axis (Sharding.psum_manual), so the aux loss, identical on every replica, is divided by D by the caller.
Row order as in parallel/manual.py: micro-batch m holds the same global rows as on one device.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe.model.options import ModelOptions
from jaxmoe.parallel.manual import local_micro, to_replica_order
from jaxmoe.sharding import REPLICA_AXIS

# statistics that are per-replica partial sums; the others (router counts, aux loss) are global already
ADDITIVE = ("nll_sum", "mtp_nll_sum", "mtp_tokens")


def _broadcast(tree, shardings, D: int):
    if tree is None:
        return None
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(
        jnp.broadcast_to(a, (D,) + a.shape), NamedSharding(s.mesh, P("data", *s.spec))), tree, shardings)


def replica_options(opts: ModelOptions) -> ModelOptions:
    """The options of the model run inside replica_grads' vmap (Sharding.in_replicas)."""
    return dataclasses.replace(opts, sharding=opts.sharding.in_replicas())


def replica_grads(local_fn: Callable, D: int, params, param_shardings, batch: dict, num_micro: int,
                  frozen=None, frozen_shardings=None):
    """local_fn(params, micro_batches [M, rows, ...], frozen) -> (fp32 grads, stats) for one data replica's
    rows, run on all D replicas; returns (grads summed over replicas, stats of the whole batch).
    `param_shardings` / `frozen_shardings`: the compute layouts (without `data`). The model in local_fn must
    run with replica_options(opts) (train/step.py does)."""
    rows = jax.tree.map(lambda x: x.reshape((D, x.shape[0] // D) + x.shape[1:]), to_replica_order(batch, num_micro))

    def one(p, b, fr):
        g, stats = local_fn(p, local_micro(b, num_micro), fr)
        return g, {k: jax.lax.psum(v, REPLICA_AXIS) if k in ADDITIVE else v for k, v in stats.items()}

    g, stats = jax.vmap(one, axis_name=REPLICA_AXIS, spmd_axis_name="data")(
        _broadcast(params, param_shardings, D), rows, _broadcast(frozen, frozen_shardings, D))
    return jax.tree.map(lambda a: a.sum(0), g), jax.tree.map(lambda a: a[0], stats)
