"""The GLM4-MoE decoder: embedding, scanned dense and MoE layer stacks, final norm, LM head, MTP.

`forward` returns final hidden states (after the final norm) plus the MTP hidden states and the MoE
routing statistics; the loss lives in jaxmoe/train/loss.py so the LM head can be fused with the cross
entropy. Layer stacks are scanned (flat compile time in depth) under the remat policy of ModelOptions.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxmoe.config import ModelConfig
from jaxmoe.model.deltas import EXPERT_DELTAS, linear
from jaxmoe.model.layers import attention_block, ops_for, rms_norm, rope_tables, swiglu
from jaxmoe.model.options import ModelOptions
from jaxmoe.moe.ep import STATS
from jaxmoe.moe.experts import routed_experts
from jaxmoe.moe.router import aux_loss, load_balancing_terms, route

ACT = ("batch", "length", "embed")


def local_moe_dispatch(x, idx, w, wi, wo, opts: ModelOptions, lora=None, send=True):
    """Routed experts for tokens x [B, T, H] (idx, w [B, T, k]) on this device (the reference; EP swaps in
    moe/ep.py) -> (y, dispatch stats: none here). `send` (whether the tokens' output is used at all) only
    saves the expert-parallel exchange, so it is ignored here."""
    H, k = x.shape[-1], idx.shape[-1]
    y = routed_experts(x.reshape(-1, H), idx.reshape(-1, k), w.reshape(-1, k), wi, wo, ops_for(opts).gmm,
                       opts.dtype, lora)
    return y.reshape(x.shape), {}


def dispatch_totals(st: dict, mask=None) -> dict:
    """The EP dispatch's token-copy counts (moe/ep.py STATS) of stacked layer stats, summed over the layers
    (where `mask`) as aux keys "moe_dropped" / "moe_overflow"."""
    return {f"moe_{k}": jnp.sum(st[k] if mask is None else jnp.where(mask, st[k], 0)) for k in STATS if k in st}


def moe_mlp(p, x, bias, valid, c: ModelConfig, opts: ModelOptions, dispatch: Callable | None = None,
            send=True):
    """x [B, T, H] -> (y [B, T, H], stats). Shared expert runs on every token, added to the routed output.
    `send` (bool scalar): False when nothing of this call is used (a pipeline bubble iteration or
    empty layer slot, parallel/pipeline.py): the dispatch then sends no token to the experts."""
    B, T, H = x.shape
    xf = x.reshape(B * T, H)
    idx, w, scores = route(xf, p["router"], bias, c)
    dispatch = dispatch or local_moe_dispatch
    ex = p.get(EXPERT_DELTAS)  # routed-expert adapters ride with the expert weights (sharded on `exp`)
    k = idx.shape[-1]
    y, dstats = dispatch(x, idx.reshape(B, T, k), w.reshape(B, T, k), p["experts_wi"], p["experts_wo"], opts,
                         **({"lora": ex} if ex else {}), send=send)
    y = checkpoint_name(y, "moe_out")
    if "shared_wi" in p:
        y = y + swiglu(p, x, "shared", opts)
    counts, probs_sum, ntok = load_balancing_terms(scores, idx, valid.reshape(-1), c.n_routed_experts)
    # over the whole micro-batch: data/expert may be manual axes in the train step (parallel/manual.py)
    counts, probs_sum, ntok, dstats = opts.sharding.psum_manual((counts, probs_sum, ntok, dstats),
                                                                ("data", "expert"))
    aux = aux_loss(counts, probs_sum, ntok, c.n_routed_experts, c.num_experts_per_tok)
    return y, {"counts": counts, "aux_loss": aux, **dstats}


def decoder_layer(p, h, bias, ctx, c: ModelConfig, opts: ModelOptions, dispatch=None):
    """One pre-norm decoder layer. `bias` is None for dense layers."""
    x = rms_norm(h, p["attn_norm"], c.rms_norm_eps, opts)
    with jax.named_scope("attention"):  # phase names in profiles / HLO metadata (the MoE's: moe/ep.py)
        a = attention_block(p, x, ctx["rope"], ctx["segment_ids"], c, opts, ctx.get("token_index"))
    h = opts.sharding.constrain(h + checkpoint_name(a, "core_attn"), ACT)
    x = rms_norm(h, p["mlp_norm"], c.rms_norm_eps, opts)
    if bias is None:
        with jax.named_scope("mlp"):
            y, stats = checkpoint_name(swiglu(p, x, "mlp", opts), "mlp"), {}
    else:
        y, stats = moe_mlp(p, x, bias, ctx["segment_ids"] > 0, c, opts, dispatch, ctx.get("moe_send", True))
    return opts.sharding.constrain(h + y, ACT), stats


def remat_layer(fn, opts: ModelOptions):
    """`fn` (a layer or scan body) under the remat policy of `opts` (--recompute_granularity / modules)."""
    if opts.remat == "none":
        return fn
    if opts.remat == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    names = opts.remat_modules or ("core_attn",)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_anything_except_these_names(*names))


def run_stack(stack, biases, h, ctx, c, opts, dispatch=None):
    """Scan a stacked layer group. biases None (dense) or [L, E]. Returns (h, stats stacked on L)."""
    def body(carry, xs):
        p, b = xs
        out, stats = decoder_layer(p, carry, b, ctx, c, opts, dispatch)
        return out, stats

    return jax.lax.scan(remat_layer(body, opts), h, (stack, biases))


def embed_tokens(params, tokens, opts: ModelOptions):
    return opts.sharding.constrain(jnp.take(params["embed"], tokens, axis=0).astype(opts.dtype), ACT)


def make_context(batch: dict, c: ModelConfig) -> dict:
    positions = batch["positions"]
    return {"rope": rope_tables(positions, c), "segment_ids": batch["segment_ids"],
            "token_index": batch.get("token_index")}


def shift_in_segment(a, segment_ids, fill=0):
    """a[:, t] <- a[:, t+1] where t+1 is in the same (non-padding) segment, else `fill`."""
    nxt = jnp.concatenate([a[:, 1:], jnp.full_like(a[:, :1], fill)], axis=1)
    seg_next = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    same = (seg_next == segment_ids) & (segment_ids > 0)
    return jnp.where(same, nxt, fill)


def shifted_field(batch: dict, key: str, depth: int, prev):
    """batch[key] shifted `depth` tokens ahead within its segment, given `prev` = the field shifted depth-1.
    Uses the host-precomputed batch[f"{key}_shift{depth}"] when present: context parallelism permutes the
    tokens (jaxmoe/parallel/context.py), where shifting along the stored order would be wrong."""
    pre = batch.get(f"{key}_shift{depth}")
    return shift_in_segment(prev, batch["segment_ids"]) if pre is None else pre.astype(prev.dtype)


def decoder(params, state, h, ctx, c: ModelConfig, opts: ModelOptions, dispatch=None):
    """Both layer stacks on hidden states h; returns (h, {'moe_counts' [L, E], 'aux_loss' scalar})."""
    aux: dict[str, Any] = {"aux_loss": jnp.zeros((), jnp.float32)}
    if "dense" in params:
        h, _ = run_stack(params["dense"], None, h, ctx, c, opts)
    if "moe" in params:
        h, st = run_stack(params["moe"], state["moe_bias"], h, ctx, c, opts, dispatch)
        aux["moe_counts"] = st["counts"]
        aux["aux_loss"] = st["aux_loss"].sum()
        aux.update(dispatch_totals(st))
    return h, aux


def mtp_token_embeddings(params, batch, n: int, opts: ModelOptions) -> list:
    """The embeddings MTP depth i (of n) reads: of the token i+1 ahead (labels shifted by i in segment)."""
    out, nxt = [], batch["labels"]  # token t+1 for the shifted (Megatron) layout
    for i in range(n):
        out.append(embed_tokens(params, nxt, opts))
        nxt = shifted_field(batch, "labels", i + 1, nxt)
    return out


def mtp_forward(params, state, h, batch, ctx, c: ModelConfig, opts: ModelOptions, dispatch=None,
                num_layers: int | None = None, embeds=None):
    """Multi-token prediction (Megatron MultiTokenPredictionBlock / DeepSeek-V3): depth i combines the
    previous depth's hidden state with the embedding of the token i+1 ahead (`embeds`: mtp_token_embeddings,
    computed here when None), runs one MoE layer and the shared-head norm.
    Returns ([h_mtp per depth], counts [n_mtp, E], aux_loss, dispatch_totals)."""
    outs, counts, aux, dstats = [], [], jnp.zeros((), jnp.float32), {}
    n = c.num_nextn_predict_layers if num_layers is None else num_layers
    embeds = mtp_token_embeddings(params, batch, n, opts) if embeds is None else embeds
    for i in range(n):
        p = jax.tree.map(lambda a: a[i], params["mtp"])
        e = embeds[i]
        x = jnp.concatenate([rms_norm(e, p["enorm"], c.rms_norm_eps, opts),
                             rms_norm(h, p["hnorm"], c.rms_norm_eps, opts)], axis=-1)
        x = linear(p, "eh_proj", x, "btk,kh->bth", opts.dtype)
        layer = remat_layer(lambda lp, hh, b: decoder_layer(lp, hh, b, ctx, c, opts, dispatch), opts)
        h, st = layer(p["layer"], x, state["mtp_bias"][i])
        outs.append(rms_norm(h, p["final_norm"], c.rms_norm_eps, opts))
        counts.append(st["counts"])
        aux = aux + st["aux_loss"]
        dstats = {k: dstats.get(k, 0) + v for k, v in dispatch_totals(st).items()}
    return outs, jnp.stack(counts), aux, dstats


def forward(params, state, batch: dict, c: ModelConfig, opts: ModelOptions, with_mtp: bool = True,
            dispatch=None, mtp_layers: int | None = None):
    """batch: input_ids, positions, segment_ids [B, T] (+ labels for MTP, optional token_index).
    Returns (h_final [B, T, H] after the final norm, aux) with aux['mtp_hidden'] when MTP runs."""
    ctx = make_context(batch, c)
    h = embed_tokens(params, batch["input_ids"], opts)
    h, aux = decoder(params, state, h, ctx, c, opts, dispatch)
    return finish_forward(params, state, h, aux, batch, ctx, c, opts, with_mtp, dispatch, mtp_layers)


def mtp_depths(c: ModelConfig, mtp_layers: int | None) -> int:
    return c.num_nextn_predict_layers if mtp_layers is None else min(mtp_layers, c.num_nextn_predict_layers)


def finish_forward(params, state, h, aux: dict, batch: dict, ctx: dict, c: ModelConfig, opts: ModelOptions,
                   with_mtp: bool = True, dispatch=None, mtp_layers: int | None = None, mtp_embeds=None):
    """Final norm and MTP on the decoder output h (the pipeline runs this after its last stage, with the MTP
    token embeddings computed beforehand: `mtp_embeds`)."""
    h = rms_norm(h, params["final_norm"], c.rms_norm_eps, opts)
    n_mtp = mtp_depths(c, mtp_layers)
    if with_mtp and n_mtp and "mtp" in params:
        aux["mtp_hidden"], aux["mtp_counts"], mtp_aux, dstats = mtp_forward(params, state, h, batch, ctx, c, opts,
                                                                            dispatch, n_mtp, mtp_embeds)
        aux["aux_loss"] = aux["aux_loss"] + mtp_aux
        aux.update({k: aux.get(k, 0) + v for k, v in dstats.items()})
    return h, aux


def lm_logits(params, h, opts: ModelOptions):
    """Full-vocabulary logits in fp32 (inference / tests; training uses the fused loss)."""
    return jnp.einsum("bth,vh->btv", h, params["lm_head"].astype(opts.dtype),
                      preferred_element_type=jnp.float32)


def default_batch(input_ids):
    B, T = input_ids.shape
    return {"input_ids": input_ids, "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "segment_ids": jnp.ones((B, T), jnp.int32)}


def batch_logits(params, state, batch: dict, c: ModelConfig, opts: ModelOptions = ModelOptions()):
    """Logits [B, T, vocab] fp32 of batch (input_ids, positions, segment_ids), MTP off."""
    h, _ = forward(params, state, batch, c, opts, with_mtp=False)
    return lm_logits(params, h, opts)


def logits_fn(params, state, input_ids, c: ModelConfig, opts: ModelOptions = ModelOptions()):
    return batch_logits(params, state, default_batch(input_ids), c, opts)
