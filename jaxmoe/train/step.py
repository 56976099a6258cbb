"""The train step: micro-batch gradient accumulation (scan), per-token loss over the global batch,
global-norm clipping, AdamW, loss-free router-bias update, and NaN/Inf step skipping. One jitted function;
no host round trip inside.

    step = make_train_step(c, opts, StepConfig(...), StepHooks(...))   # what the step does / how it is laid out
    train_state, metrics = step(train_state, batch, frozen=None)

The step is three phases: `gradients` (the micro-batch loop, per layout: one device, manual replicas,
vmapped replicas or the pipeline), `clip_by_global_norm`, and `apply_update` (AdamW, router bias, skipping)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxmoe.config import ModelConfig
from jaxmoe.model.options import ModelOptions
from jaxmoe.moe.router import updated_bias
from jaxmoe.parallel.manual import TOKEN_REPLICAS, local_micro, manual_grads, to_replica_order
from jaxmoe.parallel.pipeline import pipeline_loss
from jaxmoe.parallel.replicas import replica_grads, replica_options
from jaxmoe.sharding import REPLICA_AXIS, zeros_typed
from jaxmoe.train.loss import LossOptions, micro_loss
from jaxmoe.train.optimizer import clip_by_global_norm


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What one optimizer step does, whatever the layout."""
    loss: LossOptions
    optimizer: optax.GradientTransformation
    schedule: Callable  # lr at a given count of successful updates
    num_micro: int  # micro-batches per step and data replica
    clip_grad: float = 1.0
    bias_rate: float = 0.0  # loss-free router-bias update rate (0: frozen bias)


@dataclasses.dataclass(frozen=True)
class StepHooks:
    """How the step is laid out and what it trains; the defaults are one device and full training.

    `par` (parallel.setup.Parallel): its mesh decides the micro-batch loop (manual replicas: parallel/manual.py;
    vmapped replicas: parallel/replicas.py; pp > 1: parallel/pipeline.py). `compute_params(master, dtype)` gives
    the compute copy of the weights (cast + gathered once per step); `grad_transform` constrains gradients to
    the sharded-optimizer layout. Partial training (LoRA, frozen parameters): the train state holds only the
    trainable part and the model runs on `combine(trainable, frozen, iteration, micro_index)`; under the
    pipeline `combine(trainable, frozen)` and `adapt(tree, iteration, micro, layer_ids)` adds what differs
    per micro-batch (LoRA-dropout keys), see pipeline_loss. `param_shardings` / `frozen_shardings`: the compute
    layouts of the trainable and frozen trees (default: par's)."""
    par: Any = None
    dispatch: Callable | None = None
    compute_params: Callable | None = None
    grad_transform: Callable | None = None
    combine: Callable | None = None
    adapt: Callable | None = None
    param_shardings: Any = None
    frozen_shardings: Any = None

    @classmethod
    def for_layout(cls, par, **kw) -> "StepHooks":
        """Full training on `par`'s layout (Parallel.step_hooks), with `kw` replacing some hooks."""
        return cls(**{**par.step_hooks(), **kw})


def init_train_state(params, model_state, optimizer: optax.GradientTransformation) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "model_state": model_state,
        "updates": jnp.zeros((), jnp.int32),  # successful optimizer steps (drives the lr schedule)
        "skipped_iters": jnp.zeros((), jnp.int32),  # total non-finite steps
        "nan_in_a_row": jnp.zeros((), jnp.int32),
    }


def split_micro(batch: dict, num_micro: int) -> dict:
    """[G, T] -> [num_micro, G/num_micro, T] with row r of micro-batch m = global row m*(G/num_micro) + r."""
    return jax.tree.map(lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]), batch)


def _layout(hooks: StepHooks):
    """(manual replica axes, vmapped data replicas D, token replicas of a micro-batch, per-replica loop?)."""
    par = hooks.par
    manual = par.manual if par is not None else ()
    D = par.spec.data if par is not None and not manual else 1  # GSPMD meshes vmap over data replicas
    replicas = par.data_parallel_size if manual else D  # replicas that each hold a share of every micro-batch
    return manual, D, replicas, bool(manual) or D > 1


def _accumulate(objective, hooks: StepHooks, num_micro: int, per_replica: bool, manual):
    """local(params, mstate, mbs, frozen, scalars) -> fp32 gradient and statistics summed over micro-batches,
    one micro-batch at a time (scan)."""
    gt = hooks.grad_transform if not per_replica else None  # per-replica partial sums are reduced after the loop

    def local(params, mstate, mbs, frozen, scalars):
        def body(carry, xs):
            g_acc, s_acc = carry
            mb, i = xs
            if per_replica and hooks.combine is not None:  # own LoRA-dropout masks per replica (its rows differ)
                i = i + num_micro * jax.lax.axis_index(TOKEN_REPLICAS if manual else REPLICA_AXIS)
            (_, stats), g = jax.value_and_grad(objective, has_aux=True)(params, mstate, mb, frozen, i, scalars)
            g = gt(g) if gt is not None else g
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, s_acc, stats)), None

        zeros_g = jax.tree.map(lambda p: zeros_typed(p, jnp.float32), params)
        zeros_g = gt(zeros_g) if gt is not None else zeros_g
        first = jax.tree.map(lambda x: x[0], mbs)
        stat_shapes = jax.eval_shape(lambda: objective(params, mstate, first, frozen, 0, scalars)[1])
        init = (zeros_g, jax.tree.map(zeros_typed, stat_shapes))
        (grads, stats), _ = jax.lax.scan(body, init, (mbs, jnp.arange(num_micro)))
        return grads, stats

    return local


def _pipelined(c, opts, sc: StepConfig, hooks: StepHooks, replicas: int, per_replica: bool):
    """local(params, mstate, mbs, frozen, scalars): all micro-batches in one pipelined pass
    (parallel/pipeline.py), differentiated with respect to fp32 weights."""
    pipe, lo = hooks.par.pipeline, sc.loss

    def local(params, mstate, mbs, frozen, scalars):
        iteration, n_tok = scalars
        adapt = None
        if hooks.adapt is not None:
            offset = sc.num_micro * jax.lax.axis_index(REPLICA_AXIS) if per_replica else 0
            adapt = lambda tree, m, ids: hooks.adapt(tree, iteration, m + offset, ids)

        def f(p):
            if hooks.combine is not None:
                p = hooks.combine(p, frozen)
            obj, st = pipeline_loss(p, mstate, mbs, c, lo, opts, pipe, hooks.dispatch, adapt)
            return obj / n_tok + lo.aux_coeff * st["aux_loss"] / (sc.num_micro * replicas), st

        (_, stats), g = jax.value_and_grad(f, has_aux=True)(jax.tree.map(lambda a: a.astype(jnp.float32), params))
        return g, stats

    return local


def _gradients(c, opts, sc: StepConfig, hooks: StepHooks):
    """grads(params, mstate, batch, frozen, scalars) -> (fp32 gradient of the step's objective, statistics)."""
    manual, D, replicas, per_replica = _layout(hooks)
    par, lo, M = hooks.par, sc.loss, sc.num_micro
    if D > 1:
        opts = replica_options(opts)  # the model runs inside replica_grads' vmap only

    def objective(p, mstate, mb, frozen, i, scalars):
        iteration, n_tok = scalars
        if hooks.combine is not None:
            p = hooks.combine(p, frozen, iteration, i)
        obj, stats = micro_loss(p, mstate, mb, c, lo, opts, hooks.dispatch)
        # the aux loss is identical on every token replica; each holds its share of the global objective
        return obj / n_tok + lo.aux_coeff * stats["aux_loss"] / (M * replicas), stats

    pipe = par.pipeline if par is not None else None
    local = _pipelined(c, opts, sc, hooks, replicas, per_replica) if pipe is not None else \
        _accumulate(objective, hooks, M, per_replica, manual)

    def grads(params, mstate, batch, frozen, scalars):
        if manual:
            spec = lambda t: jax.tree.map(lambda s: s.spec, t)
            return manual_grads(
                lambda p, st, b, fr, sc_: local(p, st, local_micro(b, M), fr, sc_), par.mesh, manual, params,
                spec(hooks.param_shardings or par.param_shardings), mstate, jax.tree.map(lambda _: P(), mstate),
                to_replica_order(batch, M), par.batch_sharding().spec, frozen,
                None if frozen is None else spec(hooks.frozen_shardings or par.param_shardings), scalars)
        if D > 1:
            return replica_grads(lambda p, mbs, fr: local(p, mstate, mbs, fr, scalars), D, params,
                                 hooks.param_shardings or par.compute_shardings(), batch, M, frozen,
                                 hooks.frozen_shardings or par.frozen_shardings)
        return local(params, mstate, split_micro(batch, M), frozen, scalars)

    return grads


def apply_update(ts, grads, stats, n_tok, sc: StepConfig):
    """AdamW on the clipped gradient, the router-bias update and the step's metrics; a step whose loss or
    gradient norm is not finite leaves the state unchanged (Megatron skips it)."""
    master, mstate = ts["params"], ts["model_state"]
    grads, gnorm = clip_by_global_norm(grads, sc.clip_grad)
    lm_loss = stats["nll_sum"] / n_tok
    finite = jnp.isfinite(lm_loss) & jnp.isfinite(gnorm)
    updates, new_opt = sc.optimizer.update(grads, ts["opt_state"], master)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_mstate = dict(mstate)
    if sc.bias_rate and "moe_counts" in stats:
        new_mstate["moe_bias"] = updated_bias(mstate["moe_bias"], stats["moe_counts"], sc.bias_rate)
    if sc.bias_rate and "mtp_counts" in stats:
        n = stats["mtp_counts"].shape[0]
        new_mstate["mtp_bias"] = mstate["mtp_bias"].at[:n].set(
            updated_bias(mstate["mtp_bias"][:n], stats["mtp_counts"], sc.bias_rate))
    new_ts = {
        "params": keep(optax.apply_updates(master, updates), master),
        "opt_state": keep(new_opt, ts["opt_state"]),
        "model_state": keep(new_mstate, mstate),
        "updates": ts["updates"] + finite.astype(jnp.int32),
        "skipped_iters": ts["skipped_iters"] + (~finite).astype(jnp.int32),
        "nan_in_a_row": jnp.where(finite, 0, ts["nan_in_a_row"] + 1),
    }
    if "moe_overflow" in stats:  # a bounded EP buffer overflowed: state unchanged, the trainer re-runs the step
        new_ts = jax.tree.map(lambda a, b: jnp.where(stats["moe_overflow"] > 0, b, a), new_ts, ts)
    metrics = {
        "lm_loss": lm_loss, "grad_norm": gnorm, "lr": sc.schedule(ts["updates"]), "tokens": n_tok,
        "aux_loss": stats["aux_loss"] / sc.num_micro, "finite": finite,
        "skipped_iters": new_ts["skipped_iters"], "nan_in_a_row": new_ts["nan_in_a_row"],
    }
    if "moe_counts" in stats:
        metrics["expert_load"] = stats["moe_counts"]
    metrics.update({k: stats[k] for k in ("moe_dropped", "moe_overflow") if k in stats})  # EP token copies
    if "mtp_nll_sum" in stats:
        metrics["mtp_loss"] = stats["mtp_nll_sum"] / jnp.maximum(stats["mtp_tokens"], 1.0)
    return new_ts, metrics


def make_train_step(c: ModelConfig, opts: ModelOptions, sc: StepConfig, hooks: StepHooks = StepHooks()):
    """Returns step(train_state, batch, frozen=None) -> (train_state, metrics); `frozen` (partial training) gets
    no gradient, no optimizer state and is not part of the state."""
    grads_fn = _gradients(c, opts, sc, hooks)

    def step(ts, batch, frozen=None):
        with jax.named_scope("gradients"):
            params = hooks.compute_params(ts["params"], opts.dtype) if hooks.compute_params else ts["params"]
            n_tok = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
            iteration = ts["updates"] + ts["skipped_iters"]
            grads, stats = grads_fn(params, ts["model_state"], batch, frozen, (iteration, n_tok))
            if hooks.grad_transform is not None:
                grads = hooks.grad_transform(grads)
        with jax.named_scope("optimizer"):
            return apply_update(ts, grads, stats, n_tok, sc)

    return step


def make_eval_step(c: ModelConfig, opts: ModelOptions, hooks: StepHooks = StepHooks(), num_micro: int = 1):
    """eval(params, model_state, batch, frozen=None) -> (nll_sum, loss_tokens) of the LM loss (no MTP), with
    the hooks of make_train_step (no dropout). Under a pipeline the batch runs through the stages as
    `num_micro` micro-batches."""
    lo = LossOptions(mtp_layers=0)
    par = hooks.par
    pipe = par.pipeline if par is not None else None

    def ev(params, mstate, batch, frozen=None):
        if pipe is None:
            if hooks.combine is not None:
                params = hooks.combine(params, frozen)
            _, stats = micro_loss(params, mstate, batch, c, lo, opts, hooks.dispatch)
        else:
            params = hooks.combine(params, frozen) if hooks.combine is not None else \
                par.compute_params(params, opts.dtype)
            _, stats = pipeline_loss(params, mstate, split_micro(batch, num_micro), c, lo, opts, pipe,
                                     hooks.dispatch)
        return stats["nll_sum"], jnp.sum(batch["loss_mask"].astype(jnp.float32))

    return ev
