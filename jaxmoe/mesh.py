"""The device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes are exactly `data, stage, expert, sequence, tensor`. Model code names parameters and activations
only with logical axes (`embed`, `heads`, `vocab`, `exp`, `batch`, `length`, ...); `constrain` turns those
into sharding constraints when a mesh context is active and is a no-op otherwise, so the single-device
reference path runs the very same code.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "stage", "expert", "sequence", "tensor")
# --mesh keys -> mesh axis
_KEYS = {"dp": "data", "data": "data", "pp": "stage", "stage": "stage", "ep": "expert", "expert": "expert",
         "cp": "sequence", "sequence": "sequence", "tp": "tensor", "tensor": "tensor"}


class MeshError(ValueError):
    """An impossible parallel layout; the message names the flag and the fix."""


def logical_rules(sequence_parallel: bool = False, ep_axes: tuple[str, ...] = ("expert",),
                  etp: int = 1) -> dict[str, Any]:
    """Logical axis -> mesh axis (or tuple of axes, or None = replicated). `ep_axes`: the expert-parallel group
    (MeshSpec.ep_axes), over which the routed experts are split; etp > 1: each expert's FFN split over tensor."""
    return {
        # parameters
        "vocab": "tensor",  # vocab-parallel embedding / LM head
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
        "act_vocab": "tensor",
    }


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: jax.sharding.Mesh
    rules: dict


_CTX: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar("jaxmoe_sharding", default=None)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: dict) -> Iterator[None]:
    tok = _CTX.set(ShardingContext(mesh, rules))
    try:
        yield
    finally:
        _CTX.reset(tok)


def current_context() -> ShardingContext | None:
    return _CTX.get()


def logical_to_spec(axes, rules: dict) -> P:
    out, used = [], set()
    for a in axes:
        m = rules.get(a) if a is not None else None
        ms = (m,) if isinstance(m, str) else tuple(m or ())
        ms = tuple(x for x in ms if x not in used)  # a mesh axis may shard only one dim
        used.update(ms)
        out.append(None if not ms else ms[0] if len(ms) == 1 else ms)
    return P(*out)


def manual_axes() -> frozenset:
    """Mesh axes made manual by an enclosing shard_map (the train step's data/expert/stage region)."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def strip_axes(spec: P, drop) -> P:
    """`spec` without the mesh axes in `drop` (inside a shard_map those axes are already split)."""
    out = []
    for part in spec:
        ms = (part,) if isinstance(part, str) else tuple(part or ())
        ms = tuple(m for m in ms if m not in drop)
        out.append(None if not ms else ms[0] if len(ms) == 1 else ms)
    return P(*out)


# Name of the vmap axis over data replicas (parallel/replicas.py); while it is traced, `data` shards that
# vmapped dimension, so specs inside leave `data` out and token statistics are summed over the axis.
REPLICA_AXIS = "replica"
_REPLICAS: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxmoe_replicas", default=False)


@contextlib.contextmanager
def data_replicas() -> Iterator[None]:
    tok = _REPLICAS.set(True)
    try:
        yield
    finally:
        _REPLICAS.reset(tok)


def _drop_replica_axis(specs):
    if not _REPLICAS.get():
        return specs
    return jax.tree.map(lambda s: strip_axes(s, ("data",)), specs, is_leaf=lambda s: isinstance(s, P))


def constrain(x, axes):
    """Sharding constraint by logical axis names; identity without an active sharding context. Inside a
    partly manual shard_map the manual axes are dropped (each device already holds its own slice), inside the
    data-replica vmap the `data` axis (it shards the vmapped dimension)."""
    ctx = _CTX.get()
    if ctx is None:
        return x
    spec = _drop_replica_axis(logical_to_spec(axes, ctx.rules))
    manual = manual_axes()
    if manual:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(jax.sharding.get_abstract_mesh(), strip_axes(spec, manual)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def shard_map_rest(fn, mesh, in_specs, out_specs):
    """jax.shard_map of `fn` over every mesh axis. Inside the train step's manual region (parallel/manual.py,
    which is used only when every axis it leaves automatic has size 1) the arrays already are the per-device
    blocks and the collectives' axes are bound, so `fn` runs as it is."""
    manual = manual_axes()
    if not manual:
        return jax.shard_map(fn, mesh=mesh, in_specs=_drop_replica_axis(in_specs),
                             out_specs=_drop_replica_axis(out_specs), check_vma=False)
    rest = [a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1]
    if rest:
        # jax 0.10 cannot differentiate a scan over a nested shard_map here (see parallel/manual.py)
        raise NotImplementedError(f"a shard_map over {rest} nested in the manual axes {sorted(manual)}")
    return fn


def shard_kernel(fn, in_axes, out_axes):
    """`fn` (a Pallas kernel call) run per device: a shard_map over the mesh whose operands are split as their
    logical axes say (None: replicated). XLA cannot partition a kernel's custom call, so under GSPMD its
    operands would be all-gathered and its work repeated on every device. Identity without a sharding
    context."""
    ctx = _CTX.get()
    if ctx is None:
        return fn
    spec = lambda axes: P() if axes is None else logical_to_spec(axes, ctx.rules)
    outs = spec(out_axes) if not isinstance(out_axes, list) else [spec(a) for a in out_axes]
    return shard_map_rest(fn, ctx.mesh, tuple(spec(a) for a in in_axes), outs)


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


def psum_manual(x, axes):
    """Sum over those of `axes` that are manual here and that x varies over (a no-op outside shard_map;
    GSPMD sums over the automatic axes by itself), and over the data-replica vmap axis when `data` is one."""
    if _REPLICAS.get() and "data" in axes:
        x = jax.lax.psum(x, REPLICA_AXIS)
    manual = manual_axes()
    if not manual:
        return x

    def one(v):
        red = tuple(a for a in axes if a in manual and a in varying_axes(v))
        return jax.lax.psum(v, red) if red else v
    return jax.tree.map(one, x)


# ---- --mesh parsing ------------------------------------------------------------------------------------
# Axes that can be folded into the expert-parallel group (MoE parallel folding), in mesh order.
FOLD_AXES = ("sequence", "tensor")
_FOLD_KEYS = {"cp": "sequence", "sequence": "sequence", "tp": "tensor", "tensor": "tensor"}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int = 1
    stage: int = 1
    expert: int = 1
    sequence: int = 1
    tensor: int = 1
    # MoE parallel folding: mesh axes besides `expert` whose ranks also split the routed experts (and exchange
    # tokens) inside MoE layers; outside them they stay context / tensor parallel.
    ep_fold: tuple[str, ...] = ()
    etp: int = 1  # expert tensor parallel size: 1, or tensor (each routed expert's FFN split over `tensor`)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def ep_axes(self) -> tuple[str, ...]:
        """The expert-parallel group: `expert` and the folded axes, in mesh (major-to-minor) order."""
        return ("expert",) + tuple(a for a in FOLD_AXES if a in self.ep_fold)

    @property
    def ep_size(self) -> int:
        n = 1
        for a in self.ep_axes:
            n *= getattr(self, a)
        return n

    def describe(self) -> str:
        out = ",".join(f"{k}={getattr(self, a)}" for k, a in
                       (("dp", "data"), ("pp", "stage"), ("ep", "expert"), ("cp", "sequence"), ("tp", "tensor")))
        if self.ep_fold:
            out += ",ep_fold=" + "+".join(k for k, a in (("cp", "sequence"), ("tp", "tensor")) if a in self.ep_fold)
        return out + (f",etp={self.etp}" if self.etp > 1 else "")


def _parse_fold(text: str, value: str) -> tuple[str, ...]:
    axes = []
    for k in (v.strip() for v in value.split("+")):
        if k not in _FOLD_KEYS:
            raise MeshError(f"--mesh {text!r}: ep_fold={value}: `{k}` cannot be folded into the expert-parallel "
                            "group; use ep_fold=tp, ep_fold=cp or ep_fold=cp+tp")
        axes.append(_FOLD_KEYS[k])
    return tuple(a for a in FOLD_AXES if a in axes)


def parse_mesh(text: str, num_devices: int) -> MeshSpec:
    """'tp=4,ep=4,pp=2' -> MeshSpec; dp defaults to the devices left over."""
    sizes: dict[str, int] = {}
    fold: tuple[str, ...] = ()
    etp = "1"
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        if "=" not in part:
            raise MeshError(f"--mesh {text!r}: `{part}` is not key=value; use e.g. --mesh tp=2,ep=2,dp=2")
        k, v = (s.strip() for s in part.split("=", 1))
        if k == "ep_fold":
            fold = _parse_fold(text, v)
            continue
        if k == "etp":
            etp = v
            continue
        if k not in _KEYS:
            raise MeshError(f"--mesh {text!r}: unknown axis `{k}`; use dp/tp/ep/pp/cp (or data, tensor, expert, "
                            "stage, sequence)")
        try:
            n = int(v)
        except ValueError:
            raise MeshError(f"--mesh {text!r}: `{k}={v}` is not an integer") from None
        if n < 1:
            raise MeshError(f"--mesh {text!r}: `{k}` must be >= 1")
        axis = _KEYS[k]
        if axis in sizes:
            raise MeshError(f"--mesh {text!r}: `{axis}` given twice")
        sizes[axis] = n
    rest = 1
    for a, n in sizes.items():
        if a != "data":
            rest *= n
    if "data" not in sizes:
        if num_devices % rest:
            raise MeshError(f"--mesh {text!r}: tp*ep*pp*cp = {rest} does not divide the {num_devices} devices; "
                            "choose sizes whose product divides the device count")
        sizes["data"] = num_devices // rest
    if etp not in ("1", str(sizes.get("tensor", 1))):
        raise MeshError(f"--mesh {text!r}: etp={etp}: the expert tensor parallel size must be 1 or tp")
    spec = MeshSpec(**sizes, ep_fold=fold, etp=int(etp))
    if "tensor" in fold and spec.etp > 1:
        raise MeshError(f"--mesh {text!r}: with etp={etp} the tensor ranks split each expert; they cannot also "
                        "be folded into the expert-parallel group (drop tp from ep_fold)")
    if spec.size != num_devices:
        raise MeshError(f"--mesh {text!r}: dp*pp*ep*cp*tp = {spec.size} but there are {num_devices} devices; "
                        "the product must equal the device count (leave dp out to fill it automatically)")
    for a in fold:
        if getattr(spec, a) == 1:
            raise MeshError(f"--mesh {text!r}: ep_fold folds `{a}` but its size is 1; drop it from ep_fold")
    return spec


def megatron_mesh(num_devices: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1) -> MeshSpec:
    """Megatron's parallel sizes -> MeshSpec. Megatron: devices = tp x pp x cp x dp, and inside MoE layers the
    same tp x cp x dp ranks regroup as etp x ep x edp (MoE parallel folding), so ep costs no extra devices.
    Here the expert-parallel group is the `expert` axis (ep ranks carved out of dp) times whole tensor /
    context groups folded in (`ep_fold`); the smallest fold that works is chosen: none when ep divides dp,
    else tp, cp, then cp x tp."""
    flags = (f"--tensor_model_parallel_size {tp} --pipeline_model_parallel_size {pp} --context_parallel_size {cp} "
             f"--expert_model_parallel_size {ep} --expert_tensor_parallel_size {etp}")
    for name, n in (("tensor_model", tp), ("pipeline_model", pp), ("context", cp), ("expert_model", ep),
                    ("expert_tensor", etp)):
        if n < 1:
            raise MeshError(f"--{name}_parallel_size {n}: must be >= 1")
    if num_devices % (tp * pp * cp):
        raise MeshError(f"{flags}: tp x pp x cp = {tp * pp * cp} does not divide the {num_devices} devices; "
                        "choose sizes whose product divides the device count (dp = the devices left over)")
    dp = num_devices // (tp * pp * cp)
    if etp not in (1, tp):
        raise MeshError(f"{flags}: --expert_tensor_parallel_size {etp} must be 1 or tp ({tp}) in jaxmoe (an "
                        "expert's FFN is split over the whole tensor group or not at all)")
    if (tp * cp * dp) % (etp * ep):
        raise MeshError(f"{flags}: expert_tensor_parallel_size x expert_model_parallel_size = {etp * ep} must "
                        f"divide tp x cp x dp = {tp} x {cp} x {dp} = {tp * cp * dp}, the ranks MoE layers regroup")
    sizes = {"sequence": cp, "tensor": tp}
    folds = ((), ("sequence",)) if etp > 1 else ((), ("tensor",), ("sequence",), ("sequence", "tensor"))
    for fold in folds:
        f = 1
        for a in fold:
            f *= sizes[a]
        if (fold and f == 1) or ep % f or dp % (ep // f):
            continue
        return MeshSpec(data=dp // (ep // f), stage=pp, expert=ep // f, sequence=cp, tensor=tp, ep_fold=fold,
                        etp=etp)
    if etp > 1:
        raise MeshError(f"{flags}: with expert tensor parallelism the expert-parallel group is formed from the "
                        f"context and data ranks, so ep must divide dp ({dp}) or be cp ({cp}) times a divisor of "
                        "dp; choose such an --expert_model_parallel_size")
    raise MeshError(f"{flags}: jaxmoe folds whole tensor / context groups into the expert-parallel group, so ep "
                    f"must divide dp ({dp}), or be tp ({tp}), cp ({cp}) or cp x tp ({cp * tp}) times a divisor "
                    "of dp; choose such an --expert_model_parallel_size")


def make_mesh(spec: MeshSpec, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(spec.shape, MESH_AXES, axis_types=auto, devices=devices)
