"""The one table mapping logical axis names to mesh axes, and the sharding model code applies with it.

Model code names parameters and activations only with logical axes (`embed`, `heads`, `vocab`, `exp`, `batch`,
`length`, ...). What that means on a mesh is a `Sharding` (mesh + rules), passed explicitly in
ModelOptions.sharding; the default one has no mesh and every constraint is a no-op, so the single-device
reference path runs the very same code. Inside a partly manual shard_map the manual axes come from jax's own
abstract mesh (`jax.sharding.get_abstract_mesh()`); the data-replica vmap (parallel/replicas.py) runs the model
with a replica-mode Sharding (`in_replicas()`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# Name of the vmap axis over data replicas (parallel/replicas.py); inside it `data` shards that vmapped
# dimension, so specs leave `data` out and token statistics are summed over the axis.
REPLICA_AXIS = "replica"


def logical_rules(sequence_parallel: bool = False, ep_axes: tuple[str, ...] = ("expert",),
                  etp: int = 1, pipeline: bool = False) -> dict[str, Any]:
    """Logical axis -> mesh axis (or tuple of axes, or None = replicated). `ep_axes`: the expert-parallel group
    (MeshSpec.ep_axes), over which the routed experts are split; etp > 1: each expert's FFN split over tensor.
    `pipeline`: the embedding and LM head are split over the stages too (parallel/pipeline.py runs them on
    every micro-batch, vocab-parallel, outside the stages' loop)."""
    vocab = ("tensor", "stage") if pipeline else "tensor"
    return {
        # parameters
        "vocab": vocab,  # vocab-parallel embedding / LM head
        "embed": None,
        "heads": "tensor",  # column-parallel q, row-parallel o
        "kv_heads": "tensor",
        "head_dim": None,
        "mlp": "tensor",  # column-parallel fc1, row-parallel fc2 (dense and shared expert)
        "exp": ep_axes,  # MoE parallel folding: `expert`, plus tensor / sequence ranks when folded
        "expert_mlp": "tensor" if etp > 1 else None,
        "layers": None,  # the pipeline splits the stack itself (parallel/pipeline.py)
        "norm": None,
        # activations: the expert axis splits tokens outside MoE layers (Megatron's EP carved out of DP)
        "batch": ("data", "expert"),
        "length": ("sequence", "tensor") if sequence_parallel else "sequence",
        "length_attn": "sequence",
        "act_vocab": vocab,
    }


def _part(ms: tuple[str, ...]):
    return None if not ms else ms[0] if len(ms) == 1 else ms


def mesh_axes_of(part) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of them)."""
    return (part,) if isinstance(part, str) else tuple(part or ())


def spec_axes(spec: P) -> set[str]:
    """Every mesh axis a PartitionSpec uses."""
    return {m for part in spec for m in mesh_axes_of(part)}


def logical_to_spec(axes, rules: Mapping) -> P:
    out, used = [], set()
    for a in axes:
        ms = mesh_axes_of(rules.get(a) if a is not None else None)
        ms = tuple(x for x in ms if x not in used)  # a mesh axis may shard only one dim
        used.update(ms)
        out.append(_part(ms))
    return P(*out)


def strip_axes(spec: P, drop) -> P:
    """`spec` without the mesh axes in `drop` (inside a shard_map those axes are already split)."""
    return P(*(_part(tuple(m for m in mesh_axes_of(part) if m not in drop)) for part in spec))


def zero_spec_all(spec: P, shape: tuple[int, ...], mesh_shape: dict) -> P:
    """ZeRO-1 over the full replica group: add every mesh axis the weight is replicated on (size > 1) to an
    unsharded dim it divides. `stage` first, alone on the largest such dim (as the pipeline re-lays the
    weights out per stage, joining it with `data` made the step's reductions 20% larger); the others in mesh
    order (`data` first) join the dim chosen before when it divides further, else take the largest free one
    (the first of equal ones). Axes that fit nowhere leave the weight replicated on them."""
    parts = list(spec) + [None] * (len(shape) - len(spec))
    free = [d for d, part in enumerate(parts) if part is None]
    taken = spec_axes(spec)
    largest = lambda ds: max(ds, key=lambda d: (shape[d], -d))
    if mesh_shape.get("stage", 1) > 1 and "stage" not in taken:
        fits = [d for d in free if shape[d] % mesh_shape["stage"] == 0]
        if fits:
            parts[largest(fits)] = "stage"
            free.remove(largest(fits))
    added: dict[int, list[str]] = {}
    for axis, n in mesh_shape.items():
        if n == 1 or axis in taken or axis == "stage":
            continue
        split = lambda d: int(np.prod([mesh_shape[a] for a in added.get(d, [])]))
        fits = [d for d in free if shape[d] % (split(d) * n) == 0]
        if fits:
            d = next((d for d in fits if d in added), None)
            added.setdefault(largest(fits) if d is None else d, []).append(axis)
    for d, axes in added.items():
        parts[d] = _part(tuple(axes))
    return P(*parts)


def manual_axes() -> frozenset:
    """Mesh axes made manual by an enclosing shard_map (the train step's data/expert/stage region)."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def varying_axes(x) -> frozenset:
    """Manual axes over which x differs between devices (shard_map's varying-manual-axes type)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def zeros_typed(like, dtype=None):
    """Zeros with the shape and varying-manual-axes type of `like` (an array or a jax.eval_shape result), e.g.
    for scan carries inside shard_map."""
    mat = getattr(like, "manual_axis_type", None)
    varying = tuple(sorted(mat.varying)) if mat is not None else tuple(sorted(varying_axes(like)))
    z = jnp.zeros(like.shape, dtype or like.dtype)
    return jax.lax.pcast(z, varying, to="varying") if varying else z


def _without_data(specs):
    return jax.tree.map(lambda s: strip_axes(s, ("data",)), specs, is_leaf=lambda s: isinstance(s, P))


def shard_map_rest(fn, mesh, in_specs, out_specs, replicas: bool = False):
    """jax.shard_map of `fn` over every mesh axis (`replicas`: inside the data-replica vmap, whose dimension
    `data` shards, so the specs leave it out). Inside the train step's manual region (parallel/manual.py,
    which is used only when every axis it leaves automatic has size 1) the arrays already are the per-device
    blocks and the collectives' axes are bound, so `fn` runs as it is."""
    manual = manual_axes()
    if not manual:
        if replicas:
            in_specs, out_specs = _without_data(in_specs), _without_data(out_specs)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    rest = [a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1]
    if rest:
        # jax 0.10 cannot differentiate a scan over a nested shard_map here (see parallel/manual.py)
        raise NotImplementedError(f"a shard_map over {rest} nested in the manual axes {sorted(manual)}")
    return fn


@dataclasses.dataclass(frozen=True)
class Sharding:
    """The sharding model code applies, passed in ModelOptions.sharding (hashable: the options are jit-static).
    `mesh` None: one device, constraints are no-ops. `rules`: logical_rules() (stored as sorted items).
    `replicas`: the code runs inside the data-replica vmap (parallel/replicas.py)."""
    mesh: jax.sharding.Mesh | None = None
    rules: Any = ()
    replicas: bool = False

    def __post_init__(self):
        if isinstance(self.rules, Mapping):
            object.__setattr__(self, "rules", tuple(sorted(self.rules.items())))

    def in_replicas(self) -> Sharding:
        return dataclasses.replace(self, replicas=True)

    def spec(self, axes) -> P:
        """The PartitionSpec of logical `axes` (without `data` inside the replica vmap)."""
        spec = logical_to_spec(axes, dict(self.rules))
        return strip_axes(spec, ("data",)) if self.replicas else spec

    def constrain(self, x, axes):
        """Sharding constraint by logical axis names; identity without a mesh. Inside a partly manual
        shard_map the manual axes are dropped (each device already holds its own slice)."""
        if self.mesh is None:
            return x
        spec, manual = self.spec(axes), manual_axes()
        if manual:
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(jax.sharding.get_abstract_mesh(), strip_axes(spec, manual)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def over_stages(self, x):
        """x [S, ...] (one slice per pipeline stage): dim 0 split over `stage`, the other dims left to sharding
        propagation. A value broadcast over the stages is otherwise materialised whole on every device."""
        if self.mesh is None:
            return x
        spec = P("stage", *([P.UNCONSTRAINED] * (x.ndim - 1)))
        mesh = jax.sharding.get_abstract_mesh() if manual_axes() else self.mesh
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def shard_map(self, fn, in_specs, out_specs):
        """shard_map_rest over this mesh."""
        return shard_map_rest(fn, self.mesh, in_specs, out_specs, self.replicas)

    def kernel(self, fn, in_axes, out_axes):
        """`fn` (a Pallas kernel call) run per device: a shard_map over the mesh whose operands are split as
        their logical axes say (None: replicated). XLA cannot partition a kernel's custom call, so under GSPMD
        its operands would be all-gathered and its work repeated on every device. `fn` itself on one device."""
        if self.mesh is None:
            return fn
        spec = lambda axes: P() if axes is None else self.spec(axes)
        return self.shard_map(fn, tuple(spec(a) for a in in_axes), spec(out_axes))

    def psum_manual(self, x, axes):
        """Sum over those of `axes` that are manual here and that x varies over (a no-op outside shard_map;
        GSPMD sums over the automatic axes by itself), and over the data-replica vmap axis when `data` is
        one of them."""
        if self.replicas and "data" in axes:
            x = jax.lax.psum(x, REPLICA_AXIS)
        manual = manual_axes()
        if not manual:
            return x

        def one(v):
            red = tuple(a for a in axes if a in manual and a in varying_axes(v))
            return jax.lax.psum(v, red) if red else v
        return jax.tree.map(one, x)
