"""Low-rank weight deltas: the one hook through which adapters (LoRA) reach the model's matmuls.

A param group may carry `p[DELTAS]` = {unit: {"a": A [*in, r], "b": {weight name: B [r, *out] or {i: B}},
and for input dropout "key", "rate"}}. For each matmul y = x @ p[name] the layers add dropout(x) A B of every
unit holding a B for `name` ({i: B}: to the part y[..., i, :], e.g. the gate or up half of a fused fc1); one
A may feed several weights (q, k and v of a fused qkv adapter), computed once.
B comes pre-scaled. The routed experts' adapters ride to the dispatch opaquely as `p[EXPERT_DELTAS]`.
jaxmoe.lora builds both (lora.adapters.attach); the model knows nothing else about adapters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DELTAS = "deltas"
EXPERT_DELTAS = "expert_deltas"


def dropout(x, unit: dict):
    """Inverted dropout of the unit's input (x unchanged without a key: inference, or rate 0)."""
    if "key" not in unit:
        return x
    rate = unit["rate"]
    keep = jax.random.bernoulli(unit["key"], 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


def add_deltas(p: dict, x, ys: dict, n_in: int = 1) -> dict:
    """ys {weight name: x @ p[name]} plus every delta on those weights, units in the order of the weights
    they feed (the order the gradients of x accumulate in); x's last n_in dims are the input."""
    order = list(ys)
    units = [u for u in p.get(DELTAS, {}).values() if any(n in u["b"] for n in order)]
    for unit in sorted(units, key=lambda u: min(order.index(n) for n in u["b"] if n in order)):
        ins = "wvut"[-n_in:]  # letters descending: jnp.einsum contracts the input dims last-first, as the
        z = jnp.einsum(f"...{ins},{ins}r->...r", dropout(x, unit), unit["a"])  # LoRA code it replaced did
        ys = {**ys, **{n: _add(ys[n], z, unit["b"][n]) for n in order if n in unit["b"]}}
    return ys


def _low_rank(z, b):
    outs = "stuv"[:b.ndim - 1]
    return jnp.einsum(f"...r,r{outs}->...{outs}", z, b)


def _add(y, z, b):
    """y + z B, or for b = {i: B} z B added to each part y[..., i, :]."""
    if not isinstance(b, dict):
        return y + _low_rank(z, b)
    for i, bi in b.items():
        y = y.at[..., i, :].add(_low_rank(z, bi))
    return y


def linear(p: dict, name: str, x, eq: str, dt, n_in: int = 1):
    """einsum(eq, x, p[name]) in the compute dtype dt, plus the deltas on p[name]."""
    return add_deltas(p, x, {name: jnp.einsum(eq, x, p[name].astype(dt))}, n_in)[name]
