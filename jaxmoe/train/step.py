"""The train step: micro-batch gradient accumulation (scan), per-token loss over the global batch,
global-norm clipping, AdamW, loss-free router-bias update, and NaN/Inf step skipping. One jitted function;
no host round trip inside."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxmoe.config import ModelConfig
from jaxmoe.mesh import REPLICA_AXIS, zeros_typed
from jaxmoe.model.options import ModelOptions
from jaxmoe.moe.router import updated_bias
from jaxmoe.parallel.manual import TOKEN_REPLICAS, local_micro, manual_grads, to_replica_order
from jaxmoe.parallel.pipeline import pipeline_loss
from jaxmoe.parallel.replicas import replica_grads
from jaxmoe.train.loss import LossOptions, micro_loss
from jaxmoe.train.optimizer import clip_by_global_norm


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


def make_train_step(c: ModelConfig, opts: ModelOptions, lo: LossOptions, optimizer: optax.GradientTransformation,
                    schedule: Callable, num_micro: int, clip_grad: float, bias_rate: float,
                    dispatch=None, grad_transform: Callable | None = None,
                    compute_params: Callable | None = None, combine: Callable | None = None,
                    par=None, param_shardings=None, frozen_shardings=None):
    """Returns step(train_state, batch, frozen=None) -> (train_state, metrics). `compute_params(master, dtype)`
    gives the compute copy of the weights (cast + gathered once per step); `grad_transform` constrains the
    step's gradients to the sharded-optimizer layout. With `combine(trainable, frozen, iteration,
    micro_index)` (LoRA, frozen parameters) the train state holds only the trainable part and the model runs on
    combine's output; `frozen` gets no gradient, no optimizer state and is not part of the state.

    With `par` (a parallel.setup.Parallel) whose mesh has data replicas the micro-batch loop runs per replica and
    gradients are reduced once per step (parallel/manual.py when tp = cp = pp = 1, else parallel/replicas.py);
    under pp > 1 the micro-batches stream through the stages (parallel/pipeline.py). `param_shardings` /
    `frozen_shardings` are the compute layouts of the trainable and frozen trees (default: par's)."""
    manual = par.manual if par is not None else ()
    pipe = par.pipeline if par is not None else None
    if pipe is not None and combine is not None:
        raise ValueError("the pipeline trains full weights only (no LoRA / frozen parameters)")
    # GSPMD meshes (tp / cp / pp) with data replicas vmap over them instead (parallel/replicas.py)
    D = par.spec.data if par is not None and not manual else 1
    replicas = par.data_parallel_size if manual else D  # replicas that each hold a share of every micro-batch
    per_replica = bool(manual) or D > 1  # gradients summed locally, reduced once after the loop

    def objective(p, mstate, mb, frozen, iteration, i, n_tok):
        if combine is not None:
            p = combine(p, frozen, iteration, i)
        obj, stats = micro_loss(p, mstate, mb, c, lo, opts, dispatch)
        # the aux loss is identical on every token replica; each holds its share of the global objective
        return obj / n_tok + lo.aux_coeff * stats["aux_loss"] / (num_micro * replicas), stats

    def accumulate(params, mstate, mbs, frozen, scalars):
        """Sum of the micro-batch gradients (fp32) and statistics, one micro-batch at a time."""
        iteration, n_tok = scalars

        def body(carry, xs):
            g_acc, s_acc = carry
            mb, i = xs
            if per_replica and combine is not None:  # own LoRA-dropout masks per replica (its rows differ)
                i = i + num_micro * jax.lax.axis_index(TOKEN_REPLICAS if manual else REPLICA_AXIS)
            (_, stats), g = jax.value_and_grad(objective, has_aux=True)(params, mstate, mb, frozen, iteration, i,
                                                                        n_tok)
            if grad_transform is not None and not per_replica:
                g = grad_transform(g)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            s_acc = jax.tree.map(lambda a, b: a + b, s_acc, stats)
            return (g_acc, s_acc), None

        zeros_g = jax.tree.map(lambda p: zeros_typed(p, jnp.float32), params)
        if grad_transform is not None and not per_replica:
            zeros_g = grad_transform(zeros_g)
        first = jax.tree.map(lambda x: x[0], mbs)
        stat_shapes = jax.eval_shape(lambda: objective(params, mstate, first, frozen, iteration, 0, n_tok)[1])
        zeros_s = jax.tree.map(zeros_typed, stat_shapes)
        (grads, stats), _ = jax.lax.scan(body, (zeros_g, zeros_s), (mbs, jnp.arange(num_micro)))
        return grads, stats

    def pipelined(params, mstate, mbs, n_tok):
        """All micro-batches in one pipelined pass; gradient w.r.t. fp32 weights (parallel/pipeline.py)."""
        def f(p):
            obj, st = pipeline_loss(p, mstate, mbs, c, lo, opts, pipe, dispatch)
            return obj / n_tok + lo.aux_coeff * st["aux_loss"] / (num_micro * replicas), st

        (_, stats), g = jax.value_and_grad(f, has_aux=True)(jax.tree.map(lambda a: a.astype(jnp.float32), params))
        return g, stats

    def step(ts, batch, frozen=None):
        master, mstate = ts["params"], ts["model_state"]
        params = compute_params(master, opts.dtype) if compute_params else master
        n_tok = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        iteration = ts["updates"] + ts["skipped_iters"]
        if pipe is not None:
            local = lambda p, mbs, fr: pipelined(p, mstate, mbs, n_tok)
        else:
            local = lambda p, mbs, fr: accumulate(p, mstate, mbs, fr, (iteration, n_tok))

        if manual:
            spec = lambda t: jax.tree.map(lambda s: s.spec, t)
            grads, stats = manual_grads(
                lambda p, st, b, fr, sc: accumulate(p, st, local_micro(b, num_micro), fr, sc),
                par.mesh, manual, params, spec(param_shardings or par.param_shardings), mstate,
                jax.tree.map(lambda _: P(), mstate), to_replica_order(batch, num_micro), par.batch_sharding().spec,
                frozen, None if frozen is None else spec(frozen_shardings or par.param_shardings),
                (iteration, n_tok))
        elif D > 1:
            grads, stats = replica_grads(local, D, params, param_shardings or par.compute_shardings(), batch,
                                         num_micro, frozen, frozen_shardings or par.param_shardings)
        else:
            grads, stats = local(params, split_micro(batch, num_micro), frozen)
        if pipe is not None:
            grads = {**grads, "moe": jax.tree.map(pipe.from_stages, grads["moe"])}
        if grad_transform is not None:
            grads = grad_transform(grads)

        grads, gnorm = clip_by_global_norm(grads, clip_grad)
        lm_loss = stats["nll_sum"] / n_tok
        finite = jnp.isfinite(lm_loss) & jnp.isfinite(gnorm)
        updates, new_opt = jax.named_scope("optimizer")(optimizer.update)(grads, ts["opt_state"], master)
        new_params = optax.apply_updates(master, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_mstate = dict(mstate)
        if bias_rate and "moe_counts" in stats:
            new_mstate["moe_bias"] = updated_bias(mstate["moe_bias"], stats["moe_counts"], bias_rate)
        if bias_rate and "mtp_counts" in stats:
            n = stats["mtp_counts"].shape[0]
            new_mstate["mtp_bias"] = mstate["mtp_bias"].at[:n].set(
                updated_bias(mstate["mtp_bias"][:n], stats["mtp_counts"], bias_rate))

        new_ts = {
            "params": keep(new_params, master),
            "opt_state": keep(new_opt, ts["opt_state"]),
            "model_state": keep(new_mstate, mstate),
            "updates": ts["updates"] + finite.astype(jnp.int32),
            "skipped_iters": ts["skipped_iters"] + (~finite).astype(jnp.int32),
            "nan_in_a_row": jnp.where(finite, 0, ts["nan_in_a_row"] + 1),
        }
        if "moe_overflow" in stats:  # a bounded EP buffer overflowed: state unchanged, the trainer re-runs the step
            new_ts = jax.tree.map(lambda a, b: jnp.where(stats["moe_overflow"] > 0, b, a), new_ts, ts)
        metrics = {
            "lm_loss": lm_loss, "grad_norm": gnorm, "lr": schedule(ts["updates"]), "tokens": n_tok,
            "aux_loss": stats["aux_loss"] / num_micro, "finite": finite,
            "skipped_iters": new_ts["skipped_iters"], "nan_in_a_row": new_ts["nan_in_a_row"],
        }
        if "moe_counts" in stats:
            metrics["expert_load"] = stats["moe_counts"]
        metrics.update({k: stats[k] for k in ("moe_dropped", "moe_overflow") if k in stats})  # EP token copies
        if "mtp_nll_sum" in stats:
            metrics["mtp_loss"] = stats["mtp_nll_sum"] / jnp.maximum(stats["mtp_tokens"], 1.0)
        return new_ts, metrics

    return step


def make_eval_step(c: ModelConfig, opts: ModelOptions, dispatch=None, combine: Callable | None = None, par=None,
                   num_micro: int = 1):
    """eval(params, model_state, batch, frozen=None) -> (nll_sum, loss_tokens) of the LM loss (no MTP).
    `combine(trainable, frozen)` as in make_train_step (without dropout). Under a pipeline `par` the batch
    runs through the stages as `num_micro` micro-batches."""
    lo = LossOptions(mtp_layers=0)
    pipe = par.pipeline if par is not None else None

    def ev(params, mstate, batch, frozen=None):
        if combine is not None:
            params = combine(params, frozen)
        if pipe is not None:
            _, stats = pipeline_loss(par.compute_params(params, opts.dtype), mstate, split_micro(batch, num_micro),
                                     c, lo, opts, pipe, dispatch)
        else:
            _, stats = micro_loss(params, mstate, batch, c, lo, opts, dispatch)
        return stats["nll_sum"], jnp.sum(batch["loss_mask"].astype(jnp.float32))

    return ev
