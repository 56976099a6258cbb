"""The parameter table of the GLM4-MoE model: shape, logical axes and initialiser of every tensor.

One table drives initialisation, sharding (logical axes -> mesh axes in jaxmoe/sharding.py), weight decay (the
optimizer's mask), the HF tensor names (convert/hf_params.py), the Megatron converters and LoRA. Layers of
one kind are stacked on a leading `layers` axis and scanned:
  params["dense"]  the first `first_k_dense_replace` layers (dense SwiGLU MLP)
  params["moe"]    the remaining layers (routed experts + shared expert)
  params["mtp"]    the `num_nextn_predict_layers` multi-token-prediction modules (each wraps a MoE layer)
Linear weights are stored [in, out] (x @ W); q/k/v/o keep their head axis separate so tensor parallelism
splits heads, and the SwiGLU input weight is [H, 2, F] (gate, up) so `mlp` can be split without mixing the two.
The router correction bias is *state*, not a parameter (see init_state).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ModelConfig, get_preset


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str  # "normal" | "ones" | "zeros"
    decay: bool = True  # AdamW weight decay (Megatron: off for norms and biases)
    # HF tensor name(s): the full key for top-level tensors, the suffix after `model.layers.{i}.` for layer
    # tensors; (gate, up) for SwiGLU input weights; routed experts add `mlp.experts.{e}.` (convert/hf_params.py)
    hf: str | tuple[str, ...] | None = None


def _norm(n: int, hf: str) -> ParamSpec:
    return ParamSpec((n,), ("norm",), "ones", decay=False, hf=hf)


def _bias(shape: tuple[int, ...], axes: tuple[str | None, ...], hf: str) -> ParamSpec:
    return ParamSpec(shape, axes, "zeros", decay=False, hf=hf)


def _attention_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    H, Nq, Nkv, D = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    s = {
        "attn_norm": _norm(H, "input_layernorm.weight"),
        "wq": ParamSpec((H, Nq, D), ("embed", "heads", "head_dim"), "normal", hf="self_attn.q_proj.weight"),
        "wk": ParamSpec((H, Nkv, D), ("embed", "kv_heads", "head_dim"), "normal", hf="self_attn.k_proj.weight"),
        "wv": ParamSpec((H, Nkv, D), ("embed", "kv_heads", "head_dim"), "normal", hf="self_attn.v_proj.weight"),
        "wo": ParamSpec((Nq, D, H), ("heads", "head_dim", "embed"), "normal", hf="self_attn.o_proj.weight"),
        "mlp_norm": _norm(H, "post_attention_layernorm.weight"),
    }
    if c.attention_bias:
        s["bq"] = _bias((Nq, D), ("heads", "head_dim"), "self_attn.q_proj.bias")
        s["bk"] = _bias((Nkv, D), ("kv_heads", "head_dim"), "self_attn.k_proj.bias")
        s["bv"] = _bias((Nkv, D), ("kv_heads", "head_dim"), "self_attn.v_proj.bias")
    if c.use_qk_norm:
        s["q_norm"] = _norm(D, "self_attn.q_norm.weight")
        s["k_norm"] = _norm(D, "self_attn.k_norm.weight")
    return s


def dense_layer_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    s = _attention_specs(c)
    H, F = c.hidden_size, c.intermediate_size
    s["mlp_wi"] = ParamSpec((H, 2, F), ("embed", None, "mlp"), "normal",
                            hf=("mlp.gate_proj.weight", "mlp.up_proj.weight"))
    s["mlp_wo"] = ParamSpec((F, H), ("mlp", "embed"), "normal", hf="mlp.down_proj.weight")
    return s


def moe_layer_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    s = _attention_specs(c)
    H, E, F, Fs = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.shared_intermediate_size
    s["router"] = ParamSpec((H, E), ("embed", None), "normal", hf="mlp.gate.weight")
    s["experts_wi"] = ParamSpec((E, H, 2, F), ("exp", "embed", None, "expert_mlp"), "normal",
                                hf=("gate_proj.weight", "up_proj.weight"))
    s["experts_wo"] = ParamSpec((E, F, H), ("exp", "expert_mlp", "embed"), "normal", hf="down_proj.weight")
    if Fs:
        s["shared_wi"] = ParamSpec((H, 2, Fs), ("embed", None, "mlp"), "normal",
                                   hf=("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"))
        s["shared_wo"] = ParamSpec((Fs, H), ("mlp", "embed"), "normal", hf="mlp.shared_experts.down_proj.weight")
    return s


def mtp_specs(c: ModelConfig) -> dict[str, Any]:
    H = c.hidden_size
    return {
        "enorm": _norm(H, "enorm.weight"),
        "hnorm": _norm(H, "hnorm.weight"),
        # input = concat[enorm(emb), hnorm(h)]
        "eh_proj": ParamSpec((2 * H, H), (None, "embed"), "normal", hf="eh_proj.weight"),
        "final_norm": _norm(H, "shared_head.norm.weight"),
        "layer": moe_layer_specs(c),
    }


def _stack(specs: dict[str, Any], n: int) -> dict[str, Any]:
    return jax.tree.map(lambda p: dataclasses.replace(p, shape=(n,) + p.shape, axes=("layers",) + p.axes), specs,
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def param_specs(c: ModelConfig) -> dict[str, Any]:
    V, H = c.vocab_size, c.hidden_size
    specs: dict[str, Any] = {
        "embed": ParamSpec((V, H), ("vocab", "embed"), "normal", hf="model.embed_tokens.weight"),
        "final_norm": _norm(H, "model.norm.weight"),
        "lm_head": ParamSpec((V, H), ("vocab", "embed"), "normal", hf="lm_head.weight"),
    }
    if c.num_dense_layers:
        specs["dense"] = _stack(dense_layer_specs(c), c.num_dense_layers)
    if c.num_moe_layers:
        specs["moe"] = _stack(moe_layer_specs(c), c.num_moe_layers)
    if c.num_nextn_predict_layers:
        specs["mtp"] = _stack(mtp_specs(c), c.num_nextn_predict_layers)
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def full_table() -> dict[str, Any]:
    """The parameter table with every optional tensor present (q/k/v biases, qk norms, shared expert, MTP)."""
    return param_specs(get_preset("tiny").replace(attention_bias=True, use_qk_norm=True))


def no_decay_names() -> frozenset[str]:
    """Leaf names of the parameters trained without weight decay, from the table."""
    flat, _ = jax.tree_util.tree_flatten_with_path(full_table(), is_leaf=is_spec)
    return frozenset(str(path[-1].key) for path, spec in flat if not spec.decay)


def logical_axes(c: ModelConfig) -> dict[str, Any]:
    """Pytree (same structure as params) of logical-axis tuples."""
    return jax.tree.map(lambda p: p.axes, param_specs(c), is_leaf=is_spec)


def param_shapes(c: ModelConfig, dtype=jnp.float32) -> dict[str, Any]:
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), param_specs(c), is_leaf=is_spec)


def init_params(c: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random init like HF's `_init_weights`: normal(0, initializer_range) for weights, ones for norms,
    zeros for biases."""
    specs = param_specs(c)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def one(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (c.initializer_range * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


def init_state(c: ModelConfig) -> dict[str, jax.Array]:
    """Non-trainable model state: the router correction bias (`e_score_correction_bias`), fp32, per MoE
    layer and per MTP layer. Updated by the loss-free balancing rule outside the optimizer."""
    st = {}
    if c.num_moe_layers:
        st["moe_bias"] = jnp.zeros((c.num_moe_layers, c.n_routed_experts), jnp.float32)
    if c.num_nextn_predict_layers:
        st["mtp_bias"] = jnp.zeros((c.num_nextn_predict_layers, c.n_routed_experts), jnp.float32)
    return st


def count_params(c: ModelConfig) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(param_specs(c), is_leaf=is_spec)))


def tree_paths(tree, is_leaf: Callable | None = None) -> list[str]:
    """'moe/experts_wi'-style paths of a params-like tree, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
