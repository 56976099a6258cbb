"""Loss of one micro-batch as *sums* (nll summed over loss tokens), so the step can divide by the loss
tokens of the whole global batch (Megatron `calculate_per_token_loss`) however it is split."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig
from jaxmoe.model.layers import ops_for
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.transformer import forward, lm_logits, shifted_field
from jaxmoe.sharding import mesh_axes_of


@dataclasses.dataclass(frozen=True)
class LossOptions:
    mtp_layers: int = 0
    mtp_scale: float = 0.1
    aux_coeff: float = 0.0


def token_nll(params, h, labels, opts: ModelOptions):
    """Per-token negative log-likelihood [B, T] in fp32. The reference path builds fp32 logits (sharded over
    vocab under tensor parallelism); kernel paths use the fused linear cross entropy (no full logits)."""
    ops = ops_for(opts)
    sh = opts.sharding
    # the fused kernel needs the whole vocab: where the vocab is split (tensor parallelism, pipeline stages) the
    # vocab-split logits are used instead
    split = sh.mesh is not None and any(sh.mesh.shape[a] > 1 for a in mesh_axes_of(dict(sh.rules)["act_vocab"]))
    if getattr(ops, "choice", {}).get("cross_entropy") != "pallas" or split:
        # vocab-parallel logits: h gathered over the sequence-parallel (tensor) split first, as in Megatron,
        # else the tensor axis would go to the tokens and the whole head be all-gathered per micro-batch
        logits = sh.constrain(lm_logits(params, h, opts), ("batch", "length_attn", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return lse - tgt

    def fused(h, w, labels):
        B, T, H = h.shape
        return ops.linear_cross_entropy(h.reshape(B * T, H), w, labels.reshape(-1))[0].reshape(B, T)

    tokens = ("batch", "length")
    return sh.kernel(fused, (tokens + (None,), None, tokens), tokens)(h, params["lm_head"].astype(opts.dtype), labels)


def micro_loss(params, state, mb: dict, c: ModelConfig, lo: LossOptions, opts: ModelOptions, dispatch=None):
    """-> (objective_sum, stats). objective_sum = sum(nll) + mtp_scale * mean_over_depths(sum(mtp nll));
    the caller divides by the global number of loss tokens and adds the aux loss."""
    h, aux = forward(params, state, mb, c, opts, with_mtp=lo.mtp_layers > 0, dispatch=dispatch,
                     mtp_layers=lo.mtp_layers)
    return loss_terms(params, h, aux, mb, lo, opts)


def loss_terms(params, h, aux: dict, mb: dict, lo: LossOptions, opts: ModelOptions):
    """micro_loss from the model's outputs: h after the final norm and forward's aux (MTP hidden states)."""
    mask = mb["loss_mask"].astype(jnp.float32)
    nll = jnp.sum(token_nll(params, h, mb["labels"], opts) * mask)
    stats = {"nll_sum": nll, "aux_loss": aux["aux_loss"]}
    stats.update({k: v for k, v in aux.items() if k.startswith("moe_")})  # router counts, EP dispatch counts
    obj = nll
    if lo.mtp_layers and "mtp_hidden" in aux:
        labels, m = mb["labels"], mask
        mtp_sum, mtp_tok = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        for d, hm in enumerate(aux["mtp_hidden"], 1):
            labels = shifted_field(mb, "labels", d, labels)  # depth d predicts the token d+1 ahead
            m = shifted_field(mb, "loss_mask", d, m)
            mtp_sum += jnp.sum(token_nll(params, hm, labels, opts) * m)
            mtp_tok += jnp.sum(m)
        n = len(aux["mtp_hidden"])
        obj = obj + lo.mtp_scale / n * mtp_sum
        stats.update(mtp_nll_sum=mtp_sum / n, mtp_tokens=mtp_tok / n, mtp_counts=aux["mtp_counts"])
    return obj, stats
