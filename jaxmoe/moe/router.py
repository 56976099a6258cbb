"""The GLM-4.5 router (HF `Glm4MoeTopkRouter`, Megatron sigmoid router with expert bias), in fp32.

scores = sigmoid(x @ W); experts are *selected* on scores + correction bias with group-limited top-k
(groups ranked by the sum of their two best biased scores, only the best `topk_group` groups kept);
the combine weights are the *unbiased* scores of the chosen experts, renormalised when norm_topk_prob,
times routed_scaling_factor.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig


def route(x, router_w, bias, c: ModelConfig):
    """x [N, H] -> (topk_idx [N, k] int32, topk_w [N, k] f32, scores [N, E] f32). Megatron's first MoE phase,
    named "moe/route" (moe/ep.py names the others)."""
    with jax.named_scope("moe/route"):
        return _route(x, router_w, bias, c)


def _route(x, router_w, bias, c: ModelConfig):
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias.astype(jnp.float32)[None, :]
    N, E = choice.shape
    if c.n_group > 1 and c.topk_group < c.n_group:
        grouped = choice.reshape(N, c.n_group, E // c.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, keep = jax.lax.top_k(group_scores, c.topk_group)
        group_mask = jnp.zeros((N, c.n_group), bool).at[jnp.arange(N)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, E // c.n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, c.num_experts_per_tok)
    w = jnp.take_along_axis(scores, idx, axis=1)
    if c.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), w * c.routed_scaling_factor, scores


def load_balancing_terms(scores, idx, valid, num_experts: int):
    """Sums for Megatron's aux loss and the expert-bias update, over the valid (non-padding) tokens:
    (counts [E] f32 tokens routed per expert, probs_sum [E] f32 of the normalised sigmoid scores, n_tokens)."""
    v = valid.astype(jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(
        jnp.repeat(v, idx.shape[1]))
    probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)
    probs_sum = jnp.sum(probs * v[:, None], axis=0)
    return counts, probs_sum, jnp.sum(v)


def aux_loss(counts, probs_sum, n_tokens, num_experts: int, top_k: int):
    """Megatron `switch_load_balancing_loss_func` (coefficient applied by the caller):
    E / (k * N^2) * sum_e P_e * f_e."""
    n = jnp.maximum(n_tokens, 1.0)
    return num_experts / (top_k * n * n) * jnp.sum(probs_sum * counts)


def updated_bias(bias, counts, rate: float):
    """Loss-free balancing (Megatron `get_updated_expert_bias`): bias += rate * sign(mean_load - load)."""
    mean = counts.mean(-1, keepdims=True)
    return bias + rate * jnp.sign(mean - counts)
