"""jaxmoe parameters <-> HF `Glm4MoeForCausalLM` tensors, one tensor (or one slice) at a time.

Loading never assembles a stacked parameter in host RAM: `read_param_slice` produces exactly the block a
device shard needs (a range of layers, experts, heads ...) from the HF tensors that hold it, so
`jax.make_array_from_callback` can build sharded params straight from the files. Saving walks the
params layer by layer and yields HF tensors.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.model.params import full_table

# HF names from the parameter table (ParamSpec.hf): per-layer suffixes and top-level keys
_TABLE = full_table()
_ATTN = {n: _TABLE["moe"][n].hf for n in _TABLE["dense"] if n in _TABLE["moe"]}  # attention + the two norms
_MLP = {n: _TABLE["dense" if n.startswith("mlp_") else "moe"][n].hf
        for n in ("mlp_wi", "mlp_wo", "shared_wi", "shared_wo", "router")}
_EXPERTS = {n: _TABLE["moe"][n].hf for n in ("experts_wi", "experts_wo")}  # after `mlp.experts.{e}.`
_MTP = {n: p.hf for n, p in _TABLE["mtp"].items() if n != "layer"}
_TOP = {n: _TABLE[n].hf for n in ("embed", "final_norm", "lm_head")}
BIAS_SUFFIX = "mlp.gate.e_score_correction_bias"


def _layer_to_hf(name: str, c: ModelConfig, get: Callable[[str], np.ndarray], prefix: str,
                 experts: range | None = None) -> np.ndarray:
    """The jaxmoe value of per-layer param `name` (no layer axis) from HF tensors under `prefix`."""
    H, Nq, Nkv, D = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if name in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
        return get(prefix + _ATTN[name])
    if name in ("wq", "wk", "wv"):
        n = Nq if name == "wq" else Nkv
        return get(prefix + _ATTN[name]).T.reshape(H, n, D)
    if name in ("bq", "bk", "bv"):
        return get(prefix + _ATTN[name]).reshape(-1, D)
    if name == "wo":
        return get(prefix + _ATTN[name]).T.reshape(Nq, D, H)
    if name in ("mlp_wi", "shared_wi"):
        g, u = _MLP[name]
        return np.stack([get(prefix + g).T, get(prefix + u).T], axis=1)
    if name in ("mlp_wo", "shared_wo", "router"):
        return get(prefix + _MLP[name]).T
    if name in ("experts_wi", "experts_wo"):
        rng = experts if experts is not None else range(c.n_routed_experts)
        out = []
        for e in rng:
            ep = f"{prefix}mlp.experts.{e}."
            if name == "experts_wi":
                g, u = _EXPERTS[name]
                out.append(np.stack([get(ep + g).T, get(ep + u).T], axis=1))
            else:
                out.append(get(ep + _EXPERTS[name]).T)
        return np.stack(out)
    raise KeyError(name)


def _layer_from_hf_keys(name: str, value, c: ModelConfig, prefix: str,
                        to_host: Callable = np.asarray) -> Iterator[tuple[str, np.ndarray]]:
    """Inverse of _layer_to_hf: HF tensors for one layer's param value (experts fetched one at a time)."""
    if name in ("experts_wi", "experts_wo"):
        for e in range(value.shape[0]):
            v = to_host(value[e])
            ep = f"{prefix}mlp.experts.{e}."
            if name == "experts_wi":
                g, u = _EXPERTS[name]
                yield ep + g, np.ascontiguousarray(v[:, 0].T)
                yield ep + u, np.ascontiguousarray(v[:, 1].T)
            else:
                yield ep + _EXPERTS[name], np.ascontiguousarray(v.T)
        return
    value = to_host(value)
    if name in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
        yield prefix + _ATTN[name], value
    elif name in ("wq", "wk", "wv"):
        yield prefix + _ATTN[name], np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
    elif name in ("bq", "bk", "bv"):
        yield prefix + _ATTN[name], value.reshape(-1)
    elif name == "wo":
        yield prefix + _ATTN[name], np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
    elif name in ("mlp_wi", "shared_wi"):
        g, u = _MLP[name]
        yield prefix + g, np.ascontiguousarray(value[:, 0].T)
        yield prefix + u, np.ascontiguousarray(value[:, 1].T)
    elif name in ("mlp_wo", "shared_wo", "router"):
        yield prefix + _MLP[name], np.ascontiguousarray(value.T)
    else:
        raise KeyError(name)


def _group_layers(group: str, c: ModelConfig) -> tuple[int, int]:
    """(first HF layer number, count) of a stacked group."""
    if group == "dense":
        return 0, c.num_dense_layers
    if group == "moe":
        return c.num_dense_layers, c.num_moe_layers
    return c.num_hidden_layers, c.num_nextn_predict_layers


def read_param(path: str, c: ModelConfig, get: Callable[[str], np.ndarray],
               index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Value (or the `index` block) of jaxmoe param `path` ('moe/experts_wi', 'mtp/layer/wq', 'embed')."""
    parts = path.split("/")
    if parts[0] in ("embed", "lm_head", "final_norm"):
        key = _TOP[parts[0]]
        v = get(key)
        return v if index is None else v[index]
    group = parts[0]
    first, n = _group_layers(group, c)
    idx = tuple(index) if index is not None else (slice(None),)
    layers = range(n)[idx[0]]
    rest = idx[1:]
    experts = None
    name = parts[-1]
    if name in ("experts_wi", "experts_wo") and rest:
        experts = range(c.n_routed_experts)[rest[0]]
        rest = (slice(None),) + tuple(rest[1:])
    out = []
    for l in layers:
        prefix = f"model.layers.{first + l}."
        if group == "mtp" and parts[1] != "layer":
            v = get(prefix + _MTP[name])
            v = v.T if name == "eh_proj" else v
        else:
            v = _layer_to_hf(name, c, get, prefix, experts)
        out.append(v[rest] if rest else v)
    return np.stack(out)


def read_state(c: ModelConfig, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    st = {}
    for key, group in (("moe_bias", "moe"), ("mtp_bias", "mtp")):
        first, n = _group_layers(group, c)
        if n:
            st[key] = np.stack([get(f"model.layers.{first + l}.{BIAS_SUFFIX}").astype(np.float32)
                                for l in range(n)])
    return st


def iter_hf_tensors(params: dict, state: dict, c: ModelConfig,
                    to_host: Callable = np.asarray) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_key, array) for every HF tensor, one layer slice on the host at a time. MTP layers also get the
    `embed_tokens` / `shared_head.head` copies real GLM-4.5 checkpoints carry."""
    yield _TOP["embed"], to_host(params["embed"])
    for group in ("dense", "moe", "mtp"):
        if group not in params:
            continue
        first, n = _group_layers(group, c)
        for l in range(n):
            prefix = f"model.layers.{first + l}."
            tree = params[group]
            if group == "mtp":
                for name in ("enorm", "hnorm", "eh_proj", "final_norm"):
                    v = to_host(tree[name][l])
                    yield prefix + _MTP[name], np.ascontiguousarray(v.T) if name == "eh_proj" else v
                yield prefix + "embed_tokens.weight", to_host(params["embed"])
                yield prefix + "shared_head.head.weight", to_host(params["lm_head"])
                tree = tree["layer"]
            for name in tree:
                yield from _layer_from_hf_keys(name, tree[name][l], c, prefix, to_host)
            if group != "dense":
                yield prefix + BIAS_SUFFIX, to_host(state[f"{group}_bias"][l]).astype(np.float32)
    yield _TOP["final_norm"], to_host(params["final_norm"])
    yield _TOP["lm_head"], to_host(params["lm_head"])


def mtp_duplicate_keys(c: ModelConfig) -> dict[str, str]:
    """MTP copies of the main embedding / head: key -> the main key it must equal."""
    out = {}
    for i in range(c.num_nextn_predict_layers):
        p = f"model.layers.{c.num_hidden_layers + i}."
        out[p + "embed_tokens.weight"] = _TOP["embed"]
        out[p + "shared_head.head.weight"] = _TOP["lm_head"]
    return out


def params_from_hf(get: Callable[[str], np.ndarray], c: ModelConfig, dtype=np.float32, shardings=None):
    """(params, state) from HF tensors. With `shardings` (a params-shaped tree of jax Shardings) every device
    shard is read straight from the files (`jax.make_array_from_callback`), never the whole model at once."""
    import jax
    import jax.numpy as jnp

    from jaxmoe.model.params import is_spec, param_specs

    specs = param_specs(c)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    shard_leaves = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    leaves = []
    for (path, spec), sh in zip(flat, shard_leaves):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if sh is None:
            leaves.append(jnp.asarray(read_param(name, c, get).astype(dtype)))
        else:
            leaves.append(jax.make_array_from_callback(
                spec.shape, sh, lambda idx, name=name: read_param(name, c, get, idx).astype(dtype)))
    params = jax.tree.unflatten(treedef, leaves)
    state = {k: jnp.asarray(v) for k, v in read_state(c, get).items()}
    return params, state
