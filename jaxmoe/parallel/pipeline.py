"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule written as one SPMD program (GSPMD).

The MoE layer stack is split into `pp` stages. Its parameters are laid out as [S, Lmax, ...] (stage s's layers
in slots 0..n_s-1, zero padding after, masked out) sharded over `stage` on dim 0 (full training stores the
fp32 master and Adam moments so, parallel/setup.py; LoRA's frozen base is staged once at load time), and one
`jax.vmap(..., spmd_axis_name="stage")` runs every stage on its own micro-batch. Iteration i of the
M + S - 1 iterations (Lmax steps of one layer each) feeds micro-batch i to stage 0 and hands each stage's
output to the next stage (`jnp.roll` over the stage dim: a collective permute, run at every step and used at
each iteration's first, see hand_off); the last stage's output of iteration i is micro-batch i - S + 1.
Stages whose micro-batch index is out of range (the bubble) run on padding tokens whose router statistics are
masked out; they, and the empty layer slots of an uneven split, send no token through the expert exchange.

Work that is not part of the layer stack is spread over the stages instead of being pinned to the first /
last stage: the embedding and LM head are split over the stages by vocabulary (each stage looks up, and
computes the logits of, its share of the vocab for every micro-batch: logical axis `vocab` on tensor x stage),
the dense layers (GLM's layer 0), the final norm and MTP by micro-batch (every stage runs M/S of them).
Nothing is computed twice, no stage holds more than its share of the head's FLOPs, and no stage holds a
whole copy of the embedding or head, nor of their gradients.

Memory: every layer is rematerialised, keeping only its input hidden state for the backward pass (Megatron's
full recompute), so per-stage activation memory is (M + S - 1) x Lmax hidden states of one micro-batch plus
one layer's working set (docs/performance.md).

Differentiation is with respect to fp32 weights (the staged master itself where it needs no gather), cast to
the compute dtype one layer at a time, so the gradient summed over the M micro-batches by the loop's transpose
is accumulated in fp32, in place (Megatron's main_grad); it is reduced across data replicas once, after the
loop.
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
                                     mtp_depths, mtp_token_embeddings, run_stack)

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
    `stage`, or every device would hold all S copies). fn is rematerialised (see _per_micro)."""
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
    """The GPipe loop, one layer slot per step: (M + S - 1) iterations x `slots` steps, each running layer slot
    j of every stage (vmapped over `stage`) on the stage's micro-batch; at the first slot of an iteration each
    stage's output is handed to the next stage. x [M, B, T, H]: the embedded micro-batches. Returns (the last
    stage's outputs [M, B, T, H], router counts [S, slots, E], summed aux statistics).

    One flat loop, not a loop over layers inside a loop over iterations: each step indexes its layer out of
    the (closed-over) stacks inside the rematerialised layer, so the backward pass adds each layer's weight
    gradient in place into one fp32 accumulator of the stage's stack; an inner layer loop would stack a
    whole stage's worth of per-layer gradients every iteration before adding them (GLM-4.5-Air pp 4: 12 GiB).
    Each layer keeps only its input for the backward pass (Megatron's full recompute), whatever
    --recompute_granularity says: the schedule keeps M + S - 1 micro-batches in flight."""
    S, M, L = layout.stages, mbs["input_ids"].shape[0], layout.slots
    valid = jnp.asarray(layout.valid())
    biases = layout.to_stages(bias)
    layer_ids = layout.to_stages(jnp.arange(c.num_moe_layers))
    fields = {k: mbs[k] for k in ("positions", "segment_ids", "token_index") if k in mbs}
    stage_ids = jnp.arange(S)

    def layer_fn(stack, bias, ok, ids, h, mb, m, j):  # one stage: its layer slot j on micro-batch m
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, j, 1, 0)
        p = adapt({"moe": jax.tree.map(take, stack)}, m, take(ids))["moe"]
        p = jax.tree.map(lambda a: a[0], _cast(p, opts.dtype))  # the stack may be the fp32 master
        live = ok[j] & (m >= 0) & (m < M)
        # a bubble iteration or an empty slot: its output is dropped, so it sends no token to the experts
        out, st = decoder_layer(p, h, bias[j], {**make_context(mb, c), "moe_send": live}, c, opts, dispatch)
        return jnp.where(ok[j], out, h), st

    layer_fn = jax.checkpoint(layer_fn, policy=jax.checkpoint_policies.nothing_saveable)

    # every stage's own copy of the inputs (stage 0's is read): the hand-off and its gradient stay local
    xs = opts.sharding.over_stages(jnp.broadcast_to(x, (S,) + x.shape))

    def hand_off(h, i, j):  # at an iteration's first slot: each stage's output to the next, micro-batch i to stage 0
        first = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(i, M - 1), 1, keepdims=False)
        handed = jnp.roll(h, 1, axis=0).at[0].set(first[0])
        # a select on the scalar, permuting at every step: not lax.cond, as XLA:CPU does not order a
        # conditional's collectives with the others (devices ran them in different orders: a deadlock), and on
        # GPU the partitioner all-gathered xs over the stages inside the conditional (Air pp 4: 142 GB a step);
        # not jnp.where either, whose full-size mask would be kept for the backward pass of every step
        return jax.lax.select_n(j == 0, h, handed)

    def step(carry, k):
        h, outs, counts, aux = carry
        i, j = k // L, k % L
        # at an iteration's first slot h holds the stages' outputs of iteration i - 1, the last stage's being
        # micro-batch i - S (a bubble value before i = S, overwritten then); every stage keeps its own (local),
        # the other slots write to the spare row M
        outs = jax.lax.dynamic_update_index_in_dim(outs, h, jnp.where(j == 0, jnp.maximum(i - S, 0), M), 1)
        h = hand_off(h, i, j)
        m = i - stage_ids  # the micro-batch each stage works on
        live = (m >= 0) & (m < M)
        mb = jax.tree.map(lambda a: a[jnp.clip(m, 0, M - 1)], fields)
        mb["segment_ids"] = jnp.where(live[:, None, None], mb["segment_ids"], 0)  # bubble: padding tokens
        h, st = jax.vmap(layer_fn, (0, 0, 0, 0, 0, 0, 0, None), spmd_axis_name="stage")(
            stacks, biases, valid, layer_ids, h, mb, m, j)
        keep = valid[:, j] & live
        counts = counts.at[:, j].add(jnp.where(keep[:, None], st["counts"], 0))
        aux = jax.tree.map(jnp.add, aux, {"aux_loss": jnp.sum(jnp.where(keep, st["aux_loss"], 0.0)),
                                          **dispatch_totals(st, keep)})
        return (h, outs, counts, aux), None

    h0 = jnp.zeros((S,) + x.shape[1:], x.dtype)
    aux0 = {"aux_loss": jnp.zeros((), jnp.float32),
            **{f"moe_{k}": jnp.zeros((), jnp.int32) for k in getattr(dispatch, "stats", ())}}
    outs0 = opts.sharding.over_stages(jnp.zeros((S, M + 1) + x.shape[1:], x.dtype))
    carry = (h0, outs0, jnp.zeros((S, L, bias.shape[-1]), jnp.float32), aux0)
    (h, outs, counts, aux), _ = jax.lax.scan(step, carry, jnp.arange((M + S - 1) * L))
    return outs[S - 1, :M].at[M - 1].set(h[S - 1]), counts, aux


def _per_micro(fn, xs):
    """fn over the leading (micro-batch) dim of xs, one at a time, rematerialised (the backward pass runs after
    every micro-batch's forward: keeping each one's activations, logits!, would grow memory with M)."""
    _, out = jax.lax.scan(lambda _, x: (None, jax.checkpoint(fn)(x)), None, xs)
    return out


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
    head = {k: params[k] for k in ("embed", "lm_head") if k in params}  # vocab-parallel over tensor x stage
    body = {k: v for k, v in params.items() if k not in head and k != "moe"}
    n_mtp = mtp_depths(c, lo.mtp_layers) if lo.mtp_layers > 0 and "mtp" in body else 0
    adapt = adapt or (lambda tree, m, ids: tree)
    micro_ids = jnp.arange(Mp)
    with_head = lambda fn: lambda args: fn(adapt(_cast(head, opts.dtype), args[-1], None), *args[:-1])

    # the token embeddings of every micro-batch (the inputs and MTP's, in one loop), each stage looking up its
    # share of the vocab
    x, embeds = _per_micro(with_head(lambda p, mb: (embed_tokens(p, mb["input_ids"], opts),
                                                    mtp_token_embeddings(p, mb, n_mtp, opts))), (padded, micro_ids))
    if "dense" in body:
        def dense(p, args):  # the dense layers of one micro-batch
            h, mb, m = args
            p = adapt(_cast(p, opts.dtype), m, None)
            return run_stack(p["dense"], None, h, make_context(mb, c), c, opts)[0]

        x = _over_stages(dense, (x, padded, micro_ids), S, {"dense": body["dense"]}, opts.sharding)
    x = opts.sharding.constrain(x, MICRO_ACT)  # every stage reads micro-batch i at iteration i

    with jax.named_scope("pipeline/stages"):
        outs, counts, aux = _run_stages(params["moe"], state["moe_bias"], x, mbs, c, opts, layout, dispatch, adapt)
    outs = opts.sharding.constrain(outs, MICRO_ACT)

    def post(p, args):  # final norm and MTP of one micro-batch
        h, mb, e, m = args
        p = adapt(_cast(p, opts.dtype), m, None)
        return finish_forward(p, state, h, {"aux_loss": jnp.zeros((), jnp.float32)}, mb, make_context(mb, c), c,
                              opts, with_mtp=n_mtp > 0, dispatch=dispatch, mtp_layers=n_mtp, mtp_embeds=e)

    hf, extra = _over_stages(post, (outs, padded, embeds, micro_ids), S, body, opts.sharding)
    to_all = lambda a: opts.sharding.constrain(a, MICRO_ACT)  # every stage computes its vocab share of all
    hf = to_all(hf)
    if "mtp_hidden" in extra:
        extra["mtp_hidden"] = [to_all(h) for h in extra["mtp_hidden"]]
    # the LM head and loss of every micro-batch, each stage computing the logits of its share of the vocab
    obj, stats = _per_micro(with_head(lambda p, h, ex, mb: loss_terms(p, h, ex, mb, lo, opts)),
                            (hf, extra, padded, micro_ids))
    stats = jax.tree.map(lambda a: a.sum(0), stats)
    stats.update({k: stats.get(k, 0) + v for k, v in aux.items()})
    stats["moe_counts"] = layout.from_stages(counts)
    return obj.sum(), stats
