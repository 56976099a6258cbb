"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule written as one SPMD program (GSPMD).

The MoE layer stack is split into `pp` stages. Its parameters are re-laid out per step as [S, Lmax, ...]
(stage s's layers in slots 0..n_s-1, zero padding after, masked out) sharded over `stage` on dim 0, and one
`jax.vmap(stage_fn, spmd_axis_name="stage")` runs every stage on its own micro-batch. Iteration i of the
M + S - 1 iterations feeds micro-batch i to stage 0 and hands each stage's output to the next stage
(`jnp.roll` over the stage dim: a collective permute); the last stage's output of iteration i is micro-batch
i - S + 1. Stages whose micro-batch index is out of range (the bubble) run on padding tokens whose router
statistics are masked out; they, and the empty layer slots of an uneven split, send no token through the
expert exchange.

Work that is not part of the layer stack is spread over the stages by micro-batch instead of being pinned to
the first / last stage: before the loop every stage embeds (and runs the dense layers, GLM's layer 0, on)
M/S of the micro-batches; after it every stage runs the final norm, LM head, loss and MTP of M/S of them.
Nothing is computed twice and no stage holds more than its share of the head's FLOPs.

Memory: each iteration's stage call is rematerialised (only its input hidden state is kept for the backward
pass), so per-stage activation memory is M + S - 1 hidden states of one micro-batch plus one stage's working
set, which is what the GPipe schedule needs (docs/performance.md). Under --recompute_granularity full the
layers themselves keep only their inputs, so the stage call is not rematerialised on top (that would run every
forward a third time): M + S - 1 hidden states per layer slot instead.

Differentiation is with respect to fp32 copies of the staged weights, cast to the compute dtype inside each
stage call, so the gradient summed over the M micro-batches by the scan's transpose is accumulated in fp32
(Megatron's main_grad); it is reduced across data replicas once, after the loop.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.mesh import MeshError
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.transformer import (ACT, decoder_layer, dispatch_totals, embed_tokens, finish_forward, make_context,
                                     remat_layer, run_stack)

MICRO_ACT = (None,) + ACT  # [M, B, T, H]: micro-batch dim replicated over stages


@dataclasses.dataclass(frozen=True)
class PipelineLayout:
    """How the MoE layer stack is split over the stages: counts[s] layers on stage s, in order."""
    counts: tuple[int, ...]

    @property
    def stages(self) -> int:
        return len(self.counts)

    @property
    def slots(self) -> int:
        return max(self.counts)

    def valid(self) -> np.ndarray:
        """[S, slots] bool: slot j of stage s holds a layer."""
        return np.arange(self.slots)[None, :] < np.asarray(self.counts)[:, None]

    def to_stages(self, x):
        """[L, ...] -> [S, slots, ...] (zero padding in the empty slots)."""
        parts, start = [], 0
        for n in self.counts:
            part = x[start:start + n]
            parts.append(jnp.pad(part, [(0, self.slots - n)] + [(0, 0)] * (x.ndim - 1)))
            start += n
        return jnp.stack(parts)

    def from_stages(self, x):
        """[S, slots, ...] -> [L, ...]."""
        return jnp.concatenate([x[s, :n] for s, n in enumerate(self.counts)])

    def describe(self) -> str:
        return "/".join(map(str, self.counts))


def split_layers(c: ModelConfig, pp: int, first: int | None = None, last: int | None = None) -> PipelineLayout:
    """MoE layers per stage. Megatron's --decoder_first/last_pipeline_num_layers count every decoder layer of
    the first / last stage, the dense ones included (GLM-4.5: layer 0); the middle stages share the rest
    evenly. Without them the MoE layers are spread as evenly as possible (the dense layers run before the
    pipeline, on every stage's share of the micro-batches, see the module docstring)."""
    L, dense = c.num_moe_layers, c.num_dense_layers
    flag = "--mesh pp={}".format(pp)
    if L < pp:
        raise MeshError(f"{flag}: the model has {L} MoE layers (of {c.num_hidden_layers}), fewer than the {pp} "
                        "pipeline stages; every stage needs at least one layer: use a smaller pp")
    if first is None and last is None:
        base, extra = divmod(L, pp)
        return PipelineLayout(tuple(base + (s < extra) for s in range(pp)))
    counts: list[int | None] = [None] * pp
    if first is not None:
        if first - dense < 1:
            raise MeshError(f"--decoder_first_pipeline_num_layers {first}: the first stage needs the {dense} dense "
                            "layer(s) and at least one MoE layer")
        counts[0] = first - dense
    if last is not None:
        if last < 1:
            raise MeshError(f"--decoder_last_pipeline_num_layers {last} must be >= 1")
        counts[-1] = last
    rest = L - sum(n for n in counts if n is not None)
    middle = [s for s, n in enumerate(counts) if n is None]
    if not middle:
        if rest:
            raise MeshError(f"--decoder_first/last_pipeline_num_layers: the {pp} stages get {L - rest + dense} "
                            f"layers, the model has {c.num_hidden_layers}")
    elif rest < len(middle) or rest % len(middle):
        raise MeshError(f"--decoder_first/last_pipeline_num_layers: the other {len(middle)} stage(s) would get "
                        f"{rest} layers, which must be a positive multiple of {len(middle)} (as in Megatron)")
    for s in middle:
        counts[s] = rest // len(middle)
    return PipelineLayout(tuple(counts))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _over_stages(fn, xs, S: int, params, sharding):
    """fn(params, x) over the leading (micro-batch) dim of xs, Mp = k*S items: S at a time, one per stage.
    params go in broadcast over the stages, one slice per stage (batched, not closed over: the batching rule of
    ragged_dot, the experts' grouped matmul inside the MoE dispatch, needs every operand batched; split over
    `stage`, or every device would hold all S copies). fn is rematerialised: the backward pass runs after
    every micro-batch's forward, and keeping each one's activations (logits!) for it would grow memory with M."""
    Mp = jax.tree.leaves(xs)[0].shape[0]
    split = jax.tree.map(lambda a: a.reshape((Mp // S, S) + a.shape[1:]), xs)
    bc = jax.tree.map(lambda a: sharding.over_stages(jnp.broadcast_to(a, (S,) + a.shape)), params)
    fn = jax.vmap(jax.checkpoint(fn), spmd_axis_name="stage")
    _, out = jax.lax.scan(lambda _, x: (None, fn(bc, x)), None, split)
    return jax.tree.map(lambda a: a.reshape((Mp,) + a.shape[2:]), out)


def _pad_micro(tree, Mp: int):
    """Pad the micro-batch dim to Mp with padding rows (segment 0, no loss)."""
    M = jax.tree.leaves(tree)[0].shape[0]
    return jax.tree.map(lambda a: jnp.pad(a, [(0, Mp - M)] + [(0, 0)] * (a.ndim - 1)), tree)


def _run_stages(stacks, bias, x, mbs: dict, c: ModelConfig, opts: ModelOptions, layout: PipelineLayout, dispatch,
                adapt):
    """The GPipe loop: M + S - 1 iterations, each running every stage (vmapped over `stage`) on its micro-batch
    and handing its output to the next stage. x [M, B, T, H]: the embedded micro-batches. Returns (the last
    stage's outputs [M, B, T, H], router counts [S, slots, E], summed aux statistics)."""
    S, M = layout.stages, mbs["input_ids"].shape[0]
    valid = jnp.asarray(layout.valid())
    biases = layout.to_stages(bias)
    layer_ids = layout.to_stages(jnp.arange(c.num_moe_layers))

    def stage_fn(stack, bias, ok, ids, h, mb, m):
        stack = adapt({"moe": _cast(stack, opts.dtype)}, m, ids)["moe"]
        ctx = make_context(mb, c)
        micro_live = (m >= 0) & (m < M)

        def body(carry, xs):
            p, b, live = xs
            # a bubble iteration or an empty slot: its output is dropped, so it sends no token to the experts
            out, st = decoder_layer(p, carry, b, {**ctx, "moe_send": live & micro_live}, c, opts, dispatch)
            return jnp.where(live, out, carry), st

        return jax.lax.scan(remat_layer(body, opts), h, (stack, bias, ok))

    fields = {k: mbs[k] for k in ("positions", "segment_ids", "token_index") if k in mbs}
    stage_ids = jnp.arange(S)

    def iteration(carry, i):
        prev, outs, counts, aux = carry
        m = i - stage_ids  # the micro-batch each stage works on
        live = (m >= 0) & (m < M)
        mb = jax.tree.map(lambda a: a[jnp.clip(m, 0, M - 1)], fields)
        mb["segment_ids"] = jnp.where(live[:, None, None], mb["segment_ids"], 0)  # bubble: padding tokens
        first = jax.lax.dynamic_index_in_dim(x, jnp.minimum(i, M - 1), 0, keepdims=True)
        h = jnp.where((stage_ids == 0)[:, None, None, None], first, jnp.roll(prev, 1, axis=0))
        out, st = jax.vmap(stage_fn, spmd_axis_name="stage")(stacks, biases, valid, layer_ids, h, mb, m)
        outs = jax.lax.dynamic_update_index_in_dim(outs, out[S - 1], jnp.maximum(i - (S - 1), 0), 0)
        keep = valid & live[:, None]
        counts = counts + jnp.where(keep[..., None], st["counts"], 0)
        aux = jax.tree.map(jnp.add, aux, {"aux_loss": jnp.sum(jnp.where(keep, st["aux_loss"], 0.0)),
                                          **dispatch_totals(st, keep)})
        return (out, outs, counts, aux), None

    if opts.remat != "full":  # keep only the stage input per iteration (GPipe with full stage recomputation);
        stage_fn = jax.checkpoint(stage_fn)  # under full recompute each layer keeps its input already (Megatron's)
    h0 = jnp.zeros((S,) + x.shape[1:], x.dtype)
    aux0 = {"aux_loss": jnp.zeros((), jnp.float32),
            **{f"moe_{k}": jnp.zeros((), jnp.int32) for k in getattr(dispatch, "stats", ())}}
    carry = (h0, jnp.zeros_like(x), jnp.zeros((S, layout.slots, bias.shape[-1]), jnp.float32), aux0)
    (_, outs, counts, aux), _ = jax.lax.scan(iteration, carry, jnp.arange(M + S - 1))
    return outs, counts, aux


def pipeline_loss(params, state, mbs: dict, c: ModelConfig, lo, opts: ModelOptions, layout: PipelineLayout,
                  dispatch=None, adapt=None):
    """Sum over the M micro-batches mbs ([M, B, T] fields) of train.loss.micro_loss, computed by the pipeline.
    params["moe"] is in the staged layout [S, slots, ...]; state["moe_bias"] is canonical [L, E].
    `adapt(tree, m, layer_ids)`: what micro-batch m adds to the (compute-dtype) weights, e.g. LoRA-dropout
    keys (lora/train.py); `tree` is the unstaged part of params or {"moe": one stage's slice}, whose MoE
    layers are layer_ids [slots] (None: the unstaged part).
    Returns (objective_sum, stats) with stats summed over micro-batches, moe_counts canonical [L, E]."""
    from jaxmoe.train.loss import loss_terms

    S, M = layout.stages, mbs["input_ids"].shape[0]
    Mp = -(-M // S) * S
    padded = _pad_micro(mbs, Mp)
    rest = {k: v for k, v in params.items() if k != "moe"}

    adapt = adapt or (lambda tree, m, ids: tree)
    micro_ids = jnp.arange(Mp)

    def pre(p, args):  # embedding and dense layers of one micro-batch
        mb, m = args
        p = adapt(_cast(p, opts.dtype), m, None)
        h = embed_tokens(p, mb["input_ids"], opts)
        if "dense" in p:
            h, _ = run_stack(p["dense"], None, h, make_context(mb, c), c, opts)
        return h

    # every stage reads micro-batch i at iteration i
    x = opts.sharding.constrain(_over_stages(pre, (padded, micro_ids), S, rest, opts.sharding), MICRO_ACT)

    with jax.named_scope("pipeline/stages"):
        outs, counts, aux = _run_stages(params["moe"], state["moe_bias"], x, mbs, c, opts, layout, dispatch, adapt)
    outs = opts.sharding.constrain(outs, MICRO_ACT)

    def post(p, args):  # final norm, head, loss and MTP of one micro-batch
        h, mb, m = args
        p = adapt(_cast(p, opts.dtype), m, None)
        ctx = make_context(mb, c)
        hf, extra = finish_forward(p, state, h, {"aux_loss": jnp.zeros((), jnp.float32)}, mb, ctx, c, opts,
                                   with_mtp=lo.mtp_layers > 0, dispatch=dispatch, mtp_layers=lo.mtp_layers)
        return loss_terms(p, hf, extra, mb, lo, opts)

    obj, stats = _over_stages(post, (outs, padded, micro_ids), S, rest, opts.sharding)
    stats = jax.tree.map(lambda a: a.sum(0), stats)
    stats.update({k: stats.get(k, 0) + v for k, v in aux.items()})
    stats["moe_counts"] = layout.from_stages(counts)
    return obj.sum(), stats
