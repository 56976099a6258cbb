"""The parallel layout from the command line: `--mesh` (or Megatron's *_parallel_size flags) -> MeshSpec, its
checks against the model and batch, and the device mesh. Mesh axes are exactly `data, stage, expert,
sequence, tensor`; what model code does with them is jaxmoe/sharding.py.
"""
from __future__ import annotations

import dataclasses

import jax

from jaxmoe.config import ModelConfig

MESH_AXES = ("data", "stage", "expert", "sequence", "tensor")
# --mesh keys -> mesh axis
_KEYS = {"dp": "data", "data": "data", "pp": "stage", "stage": "stage", "ep": "expert", "expert": "expert",
         "cp": "sequence", "sequence": "sequence", "tp": "tensor", "tensor": "tensor"}


class MeshError(ValueError):
    """An impossible parallel layout; the message names the flag and the fix."""


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


MEGATRON_FLAGS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                  "context_parallel_size": "cp", "expert_model_parallel_size": "ep",
                  "expert_tensor_parallel_size": "etp"}


def mesh_spec(t, num_devices: int) -> MeshSpec:
    """The layout from Megatron's parallel-size flags (MoE parallel folding, megatron_mesh) or from the --mesh
    short form; not both."""
    given = {f: getattr(t, f) for f in MEGATRON_FLAGS if getattr(t, f, None) is not None}
    if not given:
        return parse_mesh(getattr(t, "mesh", ""), num_devices)
    if getattr(t, "mesh", ""):
        raise MeshError(f"--mesh {t.mesh} and --{next(iter(given))} both set the parallel layout; use one of "
                        "them (Megatron's *_parallel_size flags or the --mesh short form)")
    return megatron_mesh(num_devices, **{MEGATRON_FLAGS[f]: n for f, n in given.items()})


def validate_layout(spec: MeshSpec, c: ModelConfig, global_batch: int, micro_batch: int, seq_len: int) -> None:
    """Every size the layout splits must divide: heads, vocabulary, FFN widths, experts, batch, length."""
    tp, ep, cp = spec.tensor, spec.ep_size, spec.sequence
    if c.num_attention_heads % tp:
        raise MeshError(f"--mesh tp={tp}: num_attention_heads {c.num_attention_heads} is not divisible by tp")
    if c.num_key_value_heads % tp:
        raise MeshError(f"--mesh tp={tp}: num_key_value_heads {c.num_key_value_heads} is not divisible by tp; "
                        f"use tp in {[d for d in range(1, c.num_key_value_heads + 1) if c.num_key_value_heads % d == 0]}")
    if c.vocab_size % tp:
        raise MeshError(f"--mesh tp={tp}: vocab_size {c.vocab_size} is not divisible by tp (pad the vocabulary "
                        "to a multiple of tp, as Megatron's --make_vocab_size_divisible_by does)")
    if spec.stage > 1 and c.vocab_size % (tp * spec.stage):
        good = [n for n in range(2, 17) if c.vocab_size % (tp * n) == 0]
        use = f"use pp in {good} (with tp={tp}), or pad" if good else "pad"
        raise MeshError(f"--mesh pp={spec.stage}: vocab_size {c.vocab_size} is not divisible by tp x pp = "
                        f"{tp * spec.stage}: the pipeline splits the embedding and LM head over the stages (and tp) "
                        f"by vocabulary; {use} the vocabulary")
    for name, size in (("intermediate_size", c.intermediate_size), ("moe_intermediate_size", c.shared_intermediate_size)):
        if size % tp:
            raise MeshError(f"--mesh tp={tp}: {name} {size} is not divisible by tp")
    if spec.etp > 1 and c.moe_intermediate_size % spec.etp:
        raise MeshError(f"--expert_tensor_parallel_size {spec.etp}: moe_intermediate_size {c.moe_intermediate_size} "
                        "is not divisible by it")
    if (c.num_moe_layers or c.num_nextn_predict_layers) and c.n_routed_experts % ep:
        raise MeshError(f"--mesh ep={ep}: n_routed_experts {c.n_routed_experts} is not divisible by ep")
    dp_total = spec.data * spec.expert
    if global_batch % (micro_batch * dp_total):
        raise MeshError(f"--global_batch_size {global_batch} must be a multiple of micro_batch_size x dp x ep = "
                        f"{micro_batch} x {spec.data} x {spec.expert} (the data-parallel ranks)")
    if seq_len % (cp * tp if tp > 1 else cp) and cp > 1:
        raise MeshError(f"--max_length {seq_len} must be divisible by cp x tp = {cp * tp} for context/sequence "
                        "parallelism")
    if cp > 1 and seq_len % (2 * cp):
        raise MeshError(f"--max_length {seq_len} must be divisible by 2 x cp = {2 * cp} (load-balanced causal "
                        "chunks)")
