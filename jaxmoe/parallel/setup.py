"""From `--mesh` to everything the train step needs: the device mesh, parameter / optimizer / batch
shardings (Megatron TP column/row pattern via the logical-axis table, ZeRO-1 sharded optimizer over every
replica axis), and the MoE dispatch for expert parallelism. Validates the layout before any compile."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe.config import ModelConfig
from jaxmoe.mesh import (MeshError, MeshSpec, logical_rules, logical_to_spec, make_mesh, megatron_mesh, parse_mesh,
                         sharding_context)
from jaxmoe.model.params import is_spec, param_specs
from jaxmoe.moe.ep import make_ep_dispatch
from jaxmoe.parallel.context import permute_batch
from jaxmoe.parallel.pipeline import PipelineLayout, split_layers


def validate_layout(spec: MeshSpec, c: ModelConfig, global_batch: int, micro_batch: int, seq_len: int) -> None:
    tp, ep, cp = spec.tensor, spec.ep_size, spec.sequence
    if c.num_attention_heads % tp:
        raise MeshError(f"--mesh tp={tp}: num_attention_heads {c.num_attention_heads} is not divisible by tp")
    if c.num_key_value_heads % tp:
        raise MeshError(f"--mesh tp={tp}: num_key_value_heads {c.num_key_value_heads} is not divisible by tp; "
                        f"use tp in {[d for d in range(1, c.num_key_value_heads + 1) if c.num_key_value_heads % d == 0]}")
    if c.vocab_size % tp:
        raise MeshError(f"--mesh tp={tp}: vocab_size {c.vocab_size} is not divisible by tp (pad the vocabulary "
                        "to a multiple of tp, as Megatron's --make_vocab_size_divisible_by does)")
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


def _mesh_axes_of(spec: P) -> set:
    return {m for part in spec for m in ((part,) if isinstance(part, str) else tuple(part or ()))}


def zero_spec_all(spec: P, shape: tuple[int, ...], mesh_shape: dict) -> P:
    """ZeRO-1 over the full replica group: add every mesh axis the weight is replicated on (size > 1) to an
    unsharded dim it divides. `stage` first, alone on the largest such dim (as the pipeline re-lays the
    weights out per stage, joining it with `data` made the step's reductions 20% larger); the others in mesh
    order (`data` first) join the dim chosen before when it divides further, else take the largest free one
    (the first of equal ones). Axes that fit nowhere leave the weight replicated on them."""
    parts = list(spec) + [None] * (len(shape) - len(spec))
    free = [d for d, part in enumerate(parts) if part is None]
    taken = _mesh_axes_of(spec)
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
        parts[d] = axes[0] if len(axes) == 1 else tuple(axes)
    return P(*parts)


@dataclasses.dataclass
class Parallel:
    spec: MeshSpec
    mesh: jax.sharding.Mesh
    rules: dict
    param_shardings: Any  # compute layout (TP/EP)
    master_shardings: Any  # fp32 master params + optimizer moments (ZeRO over data)
    param_shapes: Any  # params-shaped tree of jax.ShapeDtypeStruct (fp32)
    dispatch: Callable | None = None
    mtp_depths: int = 0  # MTP label shifts precomputed on the host under context parallelism
    pipeline: PipelineLayout | None = None  # pp > 1: MoE layers per stage (parallel/pipeline.py)
    staged_shardings: Any = None  # pp > 1: compute layout of params["moe"] as [S, slots, ...]

    @property
    def manual(self) -> tuple[str, ...]:
        """Replica axes the train step runs manually (gradients reduced once per step; parallel/manual.py)."""
        from jaxmoe.parallel.manual import manual_axes_for
        return manual_axes_for(self.mesh)

    @property
    def data_parallel_size(self) -> int:
        return self.spec.data * self.spec.expert

    def zero_sharding(self, spec: P, shape) -> NamedSharding:
        """The sharded-optimizer layout of a weight whose compute layout is `spec` (zero_spec_all)."""
        return NamedSharding(self.mesh, zero_spec_all(spec, tuple(shape), dict(self.mesh.shape)))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def describe(self) -> str:
        return self.spec.describe()

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(("batch", "length_attn"), self.rules))

    def process_batch_shard(self) -> tuple[int, int]:
        """(index, count): this process loads rows [index*G/count, (index+1)*G/count) of each global batch of
        G rows, the rows its own devices hold under batch_sharding. count is the number of distinct row blocks
        over processes (1 when every process holds the whole batch, e.g. tp spanning processes)."""
        dp = self.data_parallel_size
        rows = sorted({(s[0].start or 0, dp if s[0].stop is None else s[0].stop)
                       for s in self.batch_sharding().addressable_devices_indices_map(
                           (dp, self.mesh.devices.size)).values()})  # a length every axis splitting it divides
        lo = hi = rows[0][0]
        for a, b in rows:
            if a > hi:
                break
            hi = max(hi, b)
        n = hi - lo
        if hi < rows[-1][1] or dp % n or lo % n:
            raise MeshError(f"--mesh {self.describe()}: process {jax.process_index()} holds batch rows {rows} of "
                            f"{dp} data ranks, not one aligned block; order the devices so that each process "
                            "owns whole data/expert ranks")
        return lo // n, dp // n

    def put_batch(self, batch: dict) -> dict:
        """Process-local rows (see process_batch_shard) -> global arrays with the batch sharding."""
        sh = self.batch_sharding()
        if self.spec.sequence > 1:  # load-balanced causal chunks per sequence rank (+ token_index, MTP shifts)
            batch = permute_batch(batch, self.spec.sequence, self.mtp_depths)
        if jax.process_count() == 1:
            return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}
        count = self.process_batch_shard()[1]
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(v), (v.shape[0] * count,) + v.shape[1:])
                for k, v in batch.items()}

    def state_shardings(self, optimizer) -> dict:
        """Shardings of the train-state dict (see train/step.py:init_train_state)."""
        opt_abstract = jax.eval_shape(optimizer.init, self.param_shapes)
        by_path = {tuple(_keys(path)): sh for path, sh in
                   jax.tree_util.tree_flatten_with_path(self.master_shardings)[0]}

        def for_leaf(path, leaf):
            keys = tuple(_keys(path))
            for n in range(len(keys)):
                if keys[n:] in by_path and by_path[keys[n:]].shard_shape(leaf.shape) is not None:
                    return by_path[keys[n:]]
            return self.replicated

        opt_sh = jax.tree_util.tree_map_with_path(for_leaf, opt_abstract)
        rep = self.replicated
        return {"params": self.master_shardings, "opt_state": opt_sh, "model_state": rep, "updates": rep,
                "skipped_iters": rep, "nan_in_a_row": rep}

    def grad_transform(self, grads):
        """Accumulated gradients live in the ZeRO layout (reduce-scattered over data)."""
        return jax.tree.map(jax.lax.with_sharding_constraint, grads, self.master_shardings)

    def compute_shardings(self):
        """Shardings of compute_params' output."""
        if self.pipeline is None:
            return self.param_shardings
        return {**self.param_shardings, "moe": self.staged_shardings}

    def compute_params(self, params, dtype):
        """Master params -> compute-dtype params in the TP/EP layout (cast first: half the all-gather bytes).
        Under the pipeline params["moe"] comes out staged, [S, slots, ...] sharded over `stage`."""
        rest = {k: v for k, v in params.items() if k != "moe" or self.pipeline is None}
        out = jax.tree.map(lambda p, s: jax.lax.with_sharding_constraint(p.astype(dtype), s), rest,
                           {k: self.param_shardings[k] for k in rest})
        if self.pipeline is not None:
            out["moe"] = jax.tree.map(lambda p, s: jax.lax.with_sharding_constraint(
                self.pipeline.to_stages(p.astype(dtype)), s), params["moe"], self.staged_shardings)
        return out

    def step_hooks(self) -> dict:
        """Keyword arguments of train.step.make_train_step for this layout (full training)."""
        return dict(dispatch=self.dispatch, grad_transform=self.grad_transform, compute_params=self.compute_params,
                    par=self)

    def context(self):
        return sharding_context(self.mesh, self.rules)


def _keys(path):
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


MEGATRON_FLAGS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                  "context_parallel_size": "cp", "expert_model_parallel_size": "ep",
                  "expert_tensor_parallel_size": "etp"}


def mesh_spec(t, num_devices: int) -> MeshSpec:
    """The layout from Megatron's parallel-size flags (MoE parallel folding, mesh.megatron_mesh) or from the
    --mesh short form; not both."""
    given = {f: getattr(t, f) for f in MEGATRON_FLAGS if getattr(t, f, None) is not None}
    if not given:
        return parse_mesh(getattr(t, "mesh", ""), num_devices)
    if getattr(t, "mesh", ""):
        raise MeshError(f"--mesh {t.mesh} and --{next(iter(given))} both set the parallel layout; use one of "
                        "them (Megatron's *_parallel_size flags or the --mesh short form)")
    return megatron_mesh(num_devices, **{MEGATRON_FLAGS[f]: n for f, n in given.items()})


def build_parallel(t, c: ModelConfig, devices=None) -> Parallel:
    devices = jax.devices() if devices is None else devices
    spec = mesh_spec(t, len(devices))
    validate_layout(spec, c, t.global_batch_size, t.micro_batch_size, t.max_length)
    pipeline = None
    if spec.stage > 1:
        pipeline = split_layers(c, spec.stage, getattr(t, "decoder_first_pipeline_num_layers", None),
                                getattr(t, "decoder_last_pipeline_num_layers", None))
        if spec.sequence > 1:
            raise MeshError(f"--mesh {spec.describe()}: context parallelism (cp) together with pipeline stages "
                            "(pp) is not supported yet; use one of them")
        if getattr(t, "train_type", "full") != "full":
            raise MeshError(f"--mesh {spec.describe()}: pipeline parallelism trains full weights only; use "
                            "--train_type full, or a mesh without pp for LoRA")
    elif getattr(t, "decoder_first_pipeline_num_layers", None) or getattr(t, "decoder_last_pipeline_num_layers",
                                                                          None):
        raise MeshError("--decoder_first/last_pipeline_num_layers need pipeline stages: add pp=N to --mesh")
    mesh = make_mesh(spec, devices)
    rules = logical_rules(sequence_parallel=getattr(t, "sequence_parallel", False), ep_axes=spec.ep_axes,
                          etp=spec.etp)
    specs = param_specs(c)
    pspecs = jax.tree.map(lambda s: logical_to_spec(s.axes, rules), specs, is_leaf=is_spec)
    shapes = jax.tree.map(lambda s: s.shape, specs, is_leaf=is_spec)
    param_sh = jax.tree.map(lambda p: NamedSharding(mesh, p), pspecs, is_leaf=lambda x: isinstance(x, P))
    # the sharded optimizer (fp32 master + Adam moments) splits over every axis a weight is replicated on
    master = jax.tree.map(lambda p, s: NamedSharding(mesh, zero_spec_all(p, s, dict(mesh.shape))),
                          pspecs, shapes, is_leaf=lambda x: isinstance(x, P))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs, is_leaf=is_spec)
    dispatch = None
    if spec.size > 1 and (c.num_moe_layers or c.num_nextn_predict_layers):
        dispatch = make_ep_dispatch(mesh, getattr(t, "moe_transport", "auto"),
                                    getattr(t, "moe_expert_capacity_factor", None),
                                    getattr(t, "moe_token_drop_policy", "probs"), spec.ep_axes, spec.etp,
                                    getattr(t, "moe_dispatch_buffer_factor", None),
                                    getattr(t, "moe_pad_expert_input_to_capacity", False))
    staged = None
    if pipeline is not None and "moe" in pspecs:
        staged = jax.tree.map(lambda p: NamedSharding(mesh, P("stage", *p)), pspecs["moe"],
                              is_leaf=lambda x: isinstance(x, P))
    return Parallel(spec, mesh, rules, param_sh, master, abstract, dispatch, mtp_depths=c.num_nextn_predict_layers,
                    pipeline=pipeline, staged_shardings=staged)
