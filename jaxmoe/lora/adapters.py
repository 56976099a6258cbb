"""LoRA adapters for GLM4-MoE: target selection, the adapter parameter table, the unmerged forward deltas,
and merging into the base weights.

An adapter *unit* adapts one base matmul y = x W with y += dropout(x) A B * scale (scale = alpha/r, or
alpha/sqrt(r) with rsLoRA). Units follow Megatron-SWIFT's module granularity where the flag names a Megatron
module (linear_qkv: ONE A shared by q, k and v; linear_fc1: one A, B over the fused (gate, up) output) and
PEFT's where it names an HF module (q_proj, gate_proj, ...: an A and B of their own):

  unit         base param     A                B                    target flags
  wqkv         wq, wk, wv     [H, r]           bq [r,Nq,D], bk, bv  linear_qkv, qkv, all-linear
  wq / wk / wv wq / wk / wv   [H, r]           [r, N, D]            q_proj / k_proj / v_proj
  wo           wo             [Nq, D, r]       [r, H]               linear_proj, proj, o_proj, all-linear
  mlp_wi       mlp_wi         [H, r]           [r, 2, F]            linear_fc1, fc1, all-linear
  mlp_wi_gate  mlp_wi[:,0]    [H, r]           [r, F]               gate_proj   (mlp_wi_up: up_proj)
  mlp_wo       mlp_wo         [F, r]           [r, H]               linear_fc2, fc2, down_proj, all-linear
  shared_*     shared_wi/wo   as mlp_*                              the above; shared_experts = its HF
                                                                    gate_proj, up_proj, down_proj
  experts_wi   experts_wi     [E, H, r]        [E, r, 2, F]         linear_fc1, fc1, experts, all-linear
  experts_wo   experts_wo     [E, F, r]        [E, r, H]            linear_fc2, fc2, experts, all-linear
  eh_proj      mtp eh_proj    [2H, r]          [r, H]               eh_proj (not in all-linear)

The router is never adapted. Adapters are their own pytree mirroring the param groups
({"dense": {unit: {"a", "b"}}, "moe": ..., "mtp": {"eh_proj": ..., "layer": {...}}}, stacked on `layers`),
with logical axes so they shard like their base weight (A replicated / B split for column-parallel, A split /
B replicated for row-parallel, both on `exp` for routed experts). `attach` hands them to the forward as the
model's generic low-rank deltas (jaxmoe/model/deltas.py); the model never imports this package.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model.deltas import DELTAS, EXPERT_DELTAS, dropout
from jaxmoe.model.params import ParamSpec, is_spec, param_specs, tree_paths

ATTN_UNITS = ("wqkv", "wq", "wk", "wv", "wo")
MLP_UNITS = ("wi", "wi_gate", "wi_up", "wo")
EXPERT_UNITS = ("experts_wi", "experts_wo")
ALL_UNITS = ATTN_UNITS + tuple(f"{p}_{u}" for p in ("mlp", "shared") for u in MLP_UNITS) + EXPERT_UNITS + (
    "eh_proj",)
UNIT_IDS = {u: i for i, u in enumerate(ALL_UNITS)}  # folds a unit into its dropout key

_FC1 = ("mlp_wi", "shared_wi", "experts_wi")
_FC2 = ("mlp_wo", "shared_wo", "experts_wo")
TARGETS = {
    "all-linear": ("wqkv", "wo") + _FC1 + _FC2,
    "linear_qkv": ("wqkv",), "qkv": ("wqkv",),
    "linear_proj": ("wo",), "proj": ("wo",), "o_proj": ("wo",),
    "linear_fc1": _FC1, "fc1": _FC1, "linear_fc2": _FC2, "fc2": _FC2,
    "q_proj": ("wq",), "k_proj": ("wk",), "v_proj": ("wv",),
    "gate_proj": ("mlp_wi_gate", "shared_wi_gate"), "up_proj": ("mlp_wi_up", "shared_wi_up"),
    "down_proj": ("mlp_wo", "shared_wo"),
    "experts": EXPERT_UNITS, "shared_experts": ("shared_wi_gate", "shared_wi_up", "shared_wo"),  # HF modules
    "eh_proj": ("eh_proj",),
}
# Two units that adapt the same output with different A's: ambiguous, refused.
_CONFLICTS = [("wqkv", "wq"), ("wqkv", "wk"), ("wqkv", "wv")] + [
    (f"{p}_wi", f"{p}_wi_{h}") for p in ("mlp", "shared") for h in ("gate", "up")]
MODULE_ALIASES = {"embed": "embed", "embed_tokens": "embed", "word_embeddings": "embed", "lm_head": "lm_head",
                  "output_layer": "lm_head", "norm": "final_norm", "final_norm": "final_norm"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("all-linear",)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def units(self) -> tuple[str, ...]:
        """Unit names selected by target_modules (validated)."""
        out: list[str] = []
        for t in self.target_modules:
            if t in ("router", "gate", "linear_router"):
                raise ConfigError(f"--target_modules {t}: the router is not a LoRA target (Megatron-SWIFT never "
                                  "adapts it); remove it")
            if t not in TARGETS:
                raise ConfigError(f"--target_modules {t!r}: unknown; choose all-linear or names from "
                                  f"{sorted(k for k in TARGETS if k != 'all-linear')}")
            out += [u for u in TARGETS[t] if u not in out]
        for a, b in _CONFLICTS:
            if a in out and b in out:
                raise ConfigError(f"--target_modules {' '.join(self.target_modules)}: `{a}` and `{b}` would both "
                                  "adapt the same projection (Megatron's fused module vs the HF one); name only one "
                                  "of them (e.g. linear_qkv OR q_proj/k_proj/v_proj)")
        return tuple(out)

    def validate(self) -> "LoraConfig":
        if self.rank <= 0:
            raise ConfigError(f"--lora_rank must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("--target_modules is empty; use all-linear or name modules")
        self.units()
        return self

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(**{**d, "target_modules": tuple(d["target_modules"])}).validate()

    @classmethod
    def from_train_config(cls, t) -> "LoraConfig":
        return cls(rank=t.lora_rank, alpha=float(t.lora_alpha), dropout=t.lora_dropout, use_rslora=t.use_rslora,
                   target_modules=tuple(t.target_modules)).validate()


# ---- the adapter table ---------------------------------------------------------------------------------
def _unit_spec(unit: str, c: ModelConfig, r: int) -> dict[str, ParamSpec]:
    H, Nq, Nkv, D, E = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.n_routed_experts
    A = lambda shape, axes: ParamSpec(shape, axes, "lora_a")
    Z = lambda shape, axes: ParamSpec(shape, axes, "zeros")
    a_in = A((H, r), ("embed", None))
    if unit in ("wq", "wk", "wv"):
        n, ax = (Nq, "heads") if unit == "wq" else (Nkv, "kv_heads")
        return {"a": a_in, "b": Z((r, n, D), (None, ax, "head_dim"))}
    if unit == "wqkv":
        return {"a": a_in, "bq": Z((r, Nq, D), (None, "heads", "head_dim")),
                "bk": Z((r, Nkv, D), (None, "kv_heads", "head_dim")), "bv": Z((r, Nkv, D), (None, "kv_heads", "head_dim"))}
    if unit == "wo":
        return {"a": A((Nq, D, r), ("heads", "head_dim", None)), "b": Z((r, H), (None, "embed"))}
    if unit.startswith(("mlp_", "shared_")):
        F = c.intermediate_size if unit.startswith("mlp_") else c.shared_intermediate_size
        kind = unit.split("_", 1)[1]
        if kind == "wi":
            return {"a": a_in, "b": Z((r, 2, F), (None, None, "mlp"))}
        if kind in ("wi_gate", "wi_up"):
            return {"a": a_in, "b": Z((r, F), (None, "mlp"))}
        return {"a": A((F, r), ("mlp", None)), "b": Z((r, H), (None, "embed"))}
    F = c.moe_intermediate_size
    if unit == "experts_wi":
        return {"a": A((E, H, r), ("exp", "embed", None)), "b": Z((E, r, 2, F), ("exp", None, None, "expert_mlp"))}
    if unit == "experts_wo":
        return {"a": A((E, F, r), ("exp", "expert_mlp", None)), "b": Z((E, r, H), ("exp", None, "embed"))}
    if unit == "eh_proj":
        return {"a": A((2 * H, r), (None, None)), "b": Z((r, H), (None, "embed"))}
    raise KeyError(unit)


def _group_units(group: str, units, c: ModelConfig) -> list[str]:
    ok = set(ATTN_UNITS)
    if group == "dense":
        ok |= {f"mlp_{u}" for u in MLP_UNITS}
    elif group == "mtp":
        ok = {"eh_proj"}
    else:  # moe and mtp/layer
        ok |= set(EXPERT_UNITS) | ({f"shared_{u}" for u in MLP_UNITS} if c.shared_intermediate_size else set())
    return [u for u in units if u in ok]


def lora_specs(c: ModelConfig, lc: LoraConfig) -> dict[str, Any]:
    """ParamSpec tree of the adapters (stacked on `layers` like their base group)."""
    units = lc.units()
    stack = lambda s, n: ParamSpec((n,) + s.shape, ("layers",) + s.axes, s.init)
    group = lambda g, n: {u: {k: stack(s, n) for k, s in _unit_spec(u, c, lc.rank).items()}
                          for u in _group_units(g, units, c)}
    out: dict[str, Any] = {}
    if c.num_dense_layers and (g := group("dense", c.num_dense_layers)):
        out["dense"] = g
    if c.num_moe_layers and (g := group("moe", c.num_moe_layers)):
        out["moe"] = g
    n = c.num_nextn_predict_layers
    if n:
        m = group("mtp", n)
        if layer := group("moe", n):
            m["layer"] = layer
        if m:
            out["mtp"] = m
    covered = {u for p in tree_paths(out, is_leaf=is_spec) for u in p.split("/") if u in UNIT_IDS}
    for t in lc.target_modules:
        if not covered & set(TARGETS[t]):
            raise ConfigError(f"--target_modules {t}: the model has no such module (e.g. no dense layers, no shared "
                              "expert, or no MTP layer); remove it")
    return out


def lora_logical_axes(c: ModelConfig, lc: LoraConfig):
    return jax.tree.map(lambda s: s.axes, lora_specs(c, lc), is_leaf=is_spec)


def init_lora(c: ModelConfig, lc: LoraConfig, key: jax.Array, dtype=jnp.float32, b_std: float = 0.0):
    """A: kaiming-uniform(a=sqrt(5)) over its input features, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT
    and Megatron-SWIFT's default); B: zeros, so the adapted model starts equal to the base. `b_std` > 0 gives a
    random B (tests only)."""
    specs = lora_specs(c, lc)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    keys = jax.random.split(key, max(len(flat), 1))
    leaves = []
    for (path, s), k in zip(flat, keys):
        if s.init == "lora_a":
            lead = 2 if s.axes[1] == "exp" else 1  # layers (+ experts) are batch dims, not fan-in
            bound = 1.0 / math.sqrt(int(np.prod(s.shape[lead:-1])))
            leaves.append(jax.random.uniform(k, s.shape, jnp.float32, -bound, bound).astype(dtype))
        elif b_std:
            leaves.append((b_std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype))
        else:
            leaves.append(jnp.zeros(s.shape, dtype))
    return jax.tree.unflatten(treedef, leaves)


def count_lora_params(c: ModelConfig, lc: LoraConfig) -> int:
    return int(sum(np.prod(s.shape) for s in jax.tree.leaves(lora_specs(c, lc), is_leaf=is_spec)))


# ---- forward -------------------------------------------------------------------------------------------
def _as_delta(unit: str, u: dict) -> dict:
    """One unit as the model's low-rank delta (model/deltas.py): its B per base weight; a gate / up adapter
    adds to that half of the fused fc1 output."""
    if unit == "wqkv":
        return {"a": u["a"], "b": {"wq": u["bq"], "wk": u["bk"], "wv": u["bv"]}}
    if unit.endswith(("_wi_gate", "_wi_up")):
        base = unit.rsplit("_", 1)[0]
        return {"a": u["a"], "b": {base: {0 if unit.endswith("gate") else 1: u["b"]}}}
    return {"a": u["a"], "b": {unit: u["b"]}}


def attach(params: dict, lora: dict, lc: LoraConfig, dtype=None, key: jax.Array | None = None) -> dict:
    """params with each group's adapters as low-rank deltas on its weights (jaxmoe.model.deltas; the routed
    experts' under EXPERT_DELTAS for the dispatch): B pre-multiplied by the scale, both cast to `dtype`. With
    `key` and dropout > 0, per-layer dropout keys ride along (training, see dropout_keys)."""
    def prep(units: dict) -> dict:
        deltas, experts = {}, {}
        for name, unit in units.items():
            u = {k: ((v.astype(jnp.float32) * lc.scale) if k.startswith("b") else v).astype(dtype or v.dtype)
                 for k, v in unit.items()}
            if name in EXPERT_UNITS:
                experts[name] = u
            else:
                deltas[name] = _as_delta(name, u)
        return {**({DELTAS: deltas} if deltas else {}), **({EXPERT_DELTAS: experts} if experts else {})}

    full = dict(params)
    for g in ("dense", "moe"):
        if g in lora:
            full[g] = {**params[g], **prep(lora[g])}
    if "mtp" in lora:
        m = dict(params["mtp"])
        if "layer" in lora["mtp"]:
            m["layer"] = {**m["layer"], **prep(lora["mtp"]["layer"])}
        if "eh_proj" in lora["mtp"]:
            m.update(prep({"eh_proj": lora["mtp"]["eh_proj"]}))
        full["mtp"] = m
    return dropout_keys(full, lc, key) if key is not None else full


def dropout_keys(params: dict, lc: LoraConfig, key: jax.Array, moe_layer_ids=None) -> dict:
    """params (with adapters attached) plus each adapted group's per-layer LoRA-dropout keys: layer l of group g
    draws from fold_in(fold_in(key, g), l) (folded with the unit's id per unit), so one stage's slice of the MoE
    stack (the pipeline) gets the same masks as the whole stack: `moe_layer_ids` are the global indices of the
    layers params["moe"] holds."""
    if lc.dropout <= 0:
        return params

    def keyed(group: dict, gid: int, ids=None) -> dict:
        ids = jnp.arange(jax.tree.leaves({k: group[k] for k in (DELTAS, EXPERT_DELTAS) if k in group})[0].shape[0]) \
            if ids is None else ids
        gk = jax.random.fold_in(key, gid)
        keys = jax.vmap(lambda i: jax.random.fold_in(gk, i))(ids)
        rate = jnp.full(ids.shape, lc.dropout, jnp.float32)
        out = dict(group)
        if DELTAS in group:
            out[DELTAS] = {name: {**u, "key": jax.vmap(jax.random.fold_in, (0, None))(keys, UNIT_IDS[name]),
                                  "rate": rate} for name, u in group[DELTAS].items()}
        if EXPERT_DELTAS in group:  # moe/experts.py draws each expert unit's mask from these
            out[EXPERT_DELTAS] = {**group[EXPERT_DELTAS], "_key": keys, "_rate": rate}
        return out

    adapted = lambda g: DELTAS in g or EXPERT_DELTAS in g
    out = dict(params)
    for gid, g in enumerate(("dense", "moe")):
        if g in out and adapted(out[g]):
            out[g] = keyed(out[g], gid, moe_layer_ids if g == "moe" else None)
    if "mtp" in out:
        m = dict(out["mtp"])
        if "layer" in m and adapted(m["layer"]):
            m["layer"] = keyed(m["layer"], 2)
        if adapted(m):
            m = keyed(m, 3)
        out["mtp"] = m
    return out


def _drop(x, lora: dict, unit: str):
    """Dropout of a routed-expert unit's input (the other units': model.deltas.dropout)."""
    if "_key" not in lora:
        return x
    return dropout(x, {"key": jax.random.fold_in(lora["_key"], UNIT_IDS[unit]), "rate": lora["_rate"]})


def lora_experts_fc1(lora, xs, gu, group_sizes, gmm):
    """(moe/experts.py) gu [M, 2F] of the rows xs [M, H] sorted by expert, plus per-expert A [E, H, r],
    B [E, r, 2, F] by the same grouped matmul as the base (no per-expert loop)."""
    if lora is None or "experts_wi" not in lora:
        return gu
    u = lora["experts_wi"]
    E, r = u["b"].shape[:2]
    z = gmm(_drop(xs, lora, "experts_wi"), u["a"], group_sizes)
    return gu + gmm(z, u["b"].reshape(E, r, -1), group_sizes)


def lora_experts_fc2(lora, h, y, group_sizes, gmm):
    if lora is None or "experts_wo" not in lora:
        return y
    u = lora["experts_wo"]
    z = gmm(_drop(h, lora, "experts_wo"), u["a"], group_sizes)
    return y + gmm(z, u["b"], group_sizes)


# ---- merge ---------------------------------------------------------------------------------------------
# unit -> [(base param, which leaf of B, einsum A,B -> delta over the stacked layer axis, slice of the base)]
_MERGE = {
    "wq": [("wq", "b", "lhr,lrnd->lhnd", None)], "wk": [("wk", "b", "lhr,lrnd->lhnd", None)],
    "wv": [("wv", "b", "lhr,lrnd->lhnd", None)],
    "wqkv": [("wq", "bq", "lhr,lrnd->lhnd", None), ("wk", "bk", "lhr,lrnd->lhnd", None),
             ("wv", "bv", "lhr,lrnd->lhnd", None)],
    "wo": [("wo", "b", "lndr,lrh->lndh", None)],
    "experts_wi": [("experts_wi", "b", "lehr,lercf->lehcf", None)],
    "experts_wo": [("experts_wo", "b", "lefr,lerh->lefh", None)],
    "eh_proj": [("eh_proj", "b", "lkr,lrh->lkh", None)],
}
for _p in ("mlp", "shared"):
    _MERGE[f"{_p}_wi"] = [(f"{_p}_wi", "b", "lhr,lrcf->lhcf", None)]
    _MERGE[f"{_p}_wi_gate"] = [(f"{_p}_wi", "b", "lhr,lrf->lhf", 0)]
    _MERGE[f"{_p}_wi_up"] = [(f"{_p}_wi", "b", "lhr,lrf->lhf", 1)]
    _MERGE[f"{_p}_wo"] = [(f"{_p}_wo", "b", "lfr,lrh->lfh", None)]


def unit_deltas(unit: str, ad: dict, scale: float):
    """[(base param name, fp32 delta stacked on layers, half index or None)] of one unit."""
    out = []
    for name, bkey, eq, half in _MERGE[unit]:
        d = jnp.einsum(eq, ad["a"].astype(jnp.float32), ad[bkey].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * scale
        out.append((name, d, half))
    return out


def merge_lora(params: dict, lora: dict, lc: LoraConfig, extras: dict | None = None) -> dict:
    """Full params W + scale * A B for every adapter (in fp32, cast back to each param's dtype), with the
    trained `extras` (modules_to_save / trainable parameters) put in place. The result needs no LoRA code."""
    def merge_group(base: dict, units: dict) -> dict:
        out = dict(base)
        for unit, ad in units.items():
            if unit == "layer":
                continue
            for name, d, half in unit_deltas(unit, ad, lc.scale):
                w = out[name].astype(jnp.float32)
                w = w.at[:, :, half].add(d) if half is not None else w + d
                out[name] = w.astype(base[name].dtype)
        return out

    full = dict(params)
    for g in ("dense", "moe"):
        if g in lora:
            full[g] = merge_group(params[g], lora[g])
    if "mtp" in lora:
        m = merge_group(params["mtp"], lora["mtp"])
        if "layer" in lora["mtp"]:
            m["layer"] = merge_group(params["mtp"]["layer"], lora["mtp"]["layer"])
        full["mtp"] = m
    if extras:
        full = put_extras(full, extras)
    return full


# ---- trainable extras (modules_to_save, --trainable_parameters / --freeze_parameters) -------------------
def select_extras(c: ModelConfig, modules_to_save=(), trainable=(), freeze=(), everything: bool = False
                  ) -> list[str]:
    """jaxmoe param paths trained besides the adapters. Regexes match with re.search on paths like
    'moe/wq', 'mtp/layer/experts_wi', 'embed'. `everything` (full training) starts from all params."""
    paths = tree_paths(param_specs(c), is_leaf=is_spec)
    chosen = set(paths) if everything else set()
    for m in modules_to_save:
        name = MODULE_ALIASES.get(m, m)
        hit = [p for p in paths if p == name or p.startswith(name + "/")]
        if not hit:
            raise ConfigError(f"--modules_to_save {m!r}: no such parameter; use embed, lm_head, final_norm or a "
                              f"jaxmoe path such as {paths[3]!r}")
        chosen |= set(hit)
    for flag, pats, add in (("trainable_parameters", trainable, True), ("freeze_parameters", freeze, False)):
        for pat in pats:
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ConfigError(f"--{flag} {pat!r}: invalid regex ({e})") from None
            hit = {p for p in paths if rx.search(p)}
            if not hit:
                raise ConfigError(f"--{flag} {pat!r} matches no parameter; paths look like {paths[:4]}")
            chosen = (chosen | hit) if add else (chosen - hit)
    return sorted(chosen)


def get_extras(params: dict, paths) -> dict:
    out: dict = {}
    for p in paths:
        keys = p.split("/")
        node, src = out, params
        for k in keys[:-1]:
            node, src = node.setdefault(k, {}), src[k]
        node[keys[-1]] = src[keys[-1]]
    return out


def put_extras(params: dict, extras: dict, dtype=None) -> dict:
    def rec(base, ex):
        out = dict(base)
        for k, v in ex.items():
            out[k] = rec(base[k], v) if isinstance(v, dict) else (v if dtype is None else v.astype(dtype))
        return out
    return rec(params, extras)
