"""From `--mesh` to everything the train step needs: the device mesh and its `Sharding` (the logical-axis
table, jaxmoe/sharding.py), parameter / optimizer shardings (Megatron TP column/row pattern, ZeRO-1 sharded
optimizer over every replica axis), the batch placement (parallel/batch.py) and the MoE dispatch for expert
parallelism. The layout is validated (jaxmoe/mesh.py) before any compile."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmoe.config import ModelConfig
from jaxmoe.mesh import MeshError, MeshSpec, make_mesh, mesh_spec, validate_layout
from jaxmoe.model.params import is_spec, param_specs
from jaxmoe.moe.ep import make_ep_dispatch
from jaxmoe.parallel.batch import BatchPlacement
from jaxmoe.parallel.manual import manual_axes_for
from jaxmoe.parallel.pipeline import PipelineLayout, split_layers
from jaxmoe.sharding import Sharding, logical_rules, zero_spec_all


@dataclasses.dataclass
class Parallel:
    """The layout (mesh, Sharding, parameter / optimizer shardings), the batch placement and the train step's
    hooks for it (step_hooks)."""
    spec: MeshSpec
    mesh: jax.sharding.Mesh
    sharding: Sharding  # what model code applies (ModelOptions.sharding)
    param_shardings: Any  # compute layout (TP/EP)
    master_shardings: Any  # fp32 master params + optimizer moments (ZeRO over data)
    param_shapes: Any  # params-shaped tree of jax.ShapeDtypeStruct (fp32)
    batch: BatchPlacement
    dispatch: Callable | None = None
    pipeline: PipelineLayout | None = None  # pp > 1: MoE layers per stage (parallel/pipeline.py)
    staged_shardings: Any = None  # pp > 1: compute layout of params["moe"] as [S, slots, ...]
    # The train state's layout of full training (fp32 master + Adam moments): master_shardings / param_shapes,
    # except that under the pipeline the MoE stack is stored staged, [S, slots, ...] split over `stage` (and
    # ZeRO over the other replica axes): each stage holds the master, gradient and moments of its own layers,
    # as in Megatron, so no step re-lays them out. Checkpoints hold the canonical layout (to_checkpoint).
    storage_shardings: Any = None
    storage_shapes: Any = None

    @property
    def manual(self) -> tuple[str, ...]:
        """Replica axes the train step runs manually (gradients reduced once per step; parallel/manual.py)."""
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
        return self.batch.sharding

    def process_batch_shard(self) -> tuple[int, int]:
        return self.batch.process_shard()

    def put_batch(self, batch: dict) -> dict:
        return self.batch.put(batch)

    def state_shardings(self, optimizer, canonical: bool = False) -> dict:
        """Shardings of full training's train-state dict (see train/step.py:init_train_state): the storage
        layout, or with `canonical` the checkpoint's (the MoE stack [L, ...] under the pipeline too)."""
        if canonical:
            return self.state_shardings_of(optimizer, self.master_shardings, self.param_shapes)
        return self.state_shardings_of(optimizer, self.storage_shardings, self.storage_shapes)

    def state_shardings_of(self, optimizer, shardings, shapes) -> dict:
        """Shardings of a train state whose params have `shardings` (shape structs `shapes`); the optimizer
        state's param-shaped leaves get their parameter's."""
        opt_abstract = jax.eval_shape(optimizer.init, shapes)
        by_path = {tuple(_keys(path)): sh for path, sh in jax.tree_util.tree_flatten_with_path(shardings)[0]}

        def for_leaf(path, leaf):
            keys = tuple(_keys(path))
            for n in range(len(keys)):
                if keys[n:] in by_path and by_path[keys[n:]].shard_shape(leaf.shape) is not None:
                    return by_path[keys[n:]]
            return self.replicated

        opt_sh = jax.tree_util.tree_map_with_path(for_leaf, opt_abstract)
        rep = self.replicated
        return {"params": shardings, "opt_state": opt_sh, "model_state": rep, "updates": rep,
                "skipped_iters": rep, "nan_in_a_row": rep}

    def stage_params(self, params):
        """Canonical params -> the storage layout's shapes: params["moe"] staged under the pipeline (traceable)."""
        if self.pipeline is None or "moe" not in params:
            return params
        return {**params, "moe": jax.tree.map(self.pipeline.to_stages, params["moe"])}

    def init_train_state(self, params, model_state, optimizer) -> dict:
        """Full training's train state, in the storage layout, from canonical fp32 master params."""
        from jaxmoe.train.step import init_train_state
        return jax.jit(lambda p, s: init_train_state(self.stage_params(p), s, optimizer),
                       out_shardings=self.state_shardings(optimizer))(params, model_state)

    def to_storage(self, state, optimizer):
        """A full-training train state (or a part of it: params, model_state, ...) in the checkpoint's canonical
        layout -> the storage layout, one MoE-stack leaf at a time (each one's canonical copy is freed)."""
        if self.pipeline is None:
            return state
        return self._restack(state, self.state_shardings(optimizer), self.pipeline.to_stages, delete=True)

    def to_checkpoint(self, state, optimizer, memory_kind: str | None = None):
        """The storage layout -> the checkpoint's canonical layout, one MoE-stack leaf at a time; `memory_kind`
        ("pinned_host"): the canonical copies are moved to host memory as they are made, so saving needs room
        for one leaf's copy on the device, not the whole stack's."""
        if self.pipeline is None:
            return state
        return self._restack(state, self.state_shardings(optimizer, canonical=True), self.pipeline.from_stages,
                             memory_kind=memory_kind)

    @staticmethod
    def _restack(state, shardings, fn, delete=False, memory_kind=None):
        """fn on each MoE-stack leaf of `state` (params["moe"], the Adam moments' ["moe"]), jitted to the
        matching leaf of `shardings` (state_shardings' prefix tree); `delete`: free each input leaf after."""
        def one(path, x, sh):
            if "moe" not in _keys(path) or not getattr(x, "ndim", 0):  # model_state's moe_bias is not "moe"
                return x
            y = _relayout(fn, sh)(x)
            if delete and isinstance(x, jax.Array):
                x.delete()
            if memory_kind is not None:
                y, dev = jax.device_put(y, sh.with_memory_kind(memory_kind)), y
                dev.delete()
            return y

        return {k: sub if isinstance(shardings[k], NamedSharding) else
                jax.tree_util.tree_map_with_path(one, sub, shardings[k]) for k, sub in state.items()}

    def grad_transform(self, grads):
        """Accumulated gradients live in the ZeRO layout of the storage (reduce-scattered over data)."""
        return jax.tree.map(jax.lax.with_sharding_constraint, grads, self.storage_shardings)

    def compute_shardings(self):
        """Shardings of compute_params' output."""
        if self.pipeline is None:
            return self.param_shardings
        return {**self.param_shardings, "moe": self.staged_shardings}

    @property
    def frozen_shardings(self):
        """Layout of the frozen base of partial training: the compute layout, params["moe"] staged under the
        pipeline (kept staged for the whole run, see stage_frozen)."""
        return self.compute_shardings()

    def stage_frozen(self, params):
        """The frozen base (compute dtype, param_shardings) -> frozen_shardings: params["moe"] re-laid out per
        stage once, at load time."""
        if self.pipeline is None:
            return params
        stage = lambda a, s: jax.jit(self.pipeline.to_stages, out_shardings=s)(a)
        moe = jax.tree.map(stage, params["moe"], self.staged_shardings)
        return {**params, "moe": moe}

    def compute_params(self, params, dtype):
        """Master params (storage layout) -> compute-dtype params in the TP/EP layout (cast first: half the
        all-gather bytes). Under the pipeline the stored MoE stack is staged already; where its storage is its
        compute layout (no ZeRO split to gather) it stays fp32: each layer casts its weights inside the
        pipeline, which so differentiates the master itself (no compute copy of the stack, and the gradient
        comes out in the storage layout)."""
        wsc = jax.lax.with_sharding_constraint
        rest = {k: v for k, v in params.items() if k != "moe" or self.pipeline is None}
        out = jax.tree.map(lambda p, s: wsc(p.astype(dtype), s), rest, {k: self.param_shardings[k] for k in rest})
        if self.pipeline is not None and "moe" in params:
            out["moe"] = jax.tree.map(lambda p, st, s: wsc(p if st.spec == s.spec else p.astype(dtype), s),
                                      params["moe"], self.storage_shardings["moe"], self.staged_shardings)
        return out

    def step_hooks(self) -> dict:
        """Keyword arguments of train.step.make_train_step for this layout (full training)."""
        return dict(dispatch=self.dispatch, grad_transform=self.grad_transform, compute_params=self.compute_params,
                    par=self)


def _keys(path):
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


@functools.lru_cache(maxsize=None)
def _relayout(fn, sharding):
    return jax.jit(fn, out_shardings=sharding)


def _pipeline_layout(t, spec: MeshSpec, c: ModelConfig) -> PipelineLayout | None:
    """The MoE layers per stage (pp > 1); the pipeline flags checked against the mesh."""
    first = getattr(t, "decoder_first_pipeline_num_layers", None)
    last = getattr(t, "decoder_last_pipeline_num_layers", None)
    if spec.stage == 1:
        if first or last:
            raise MeshError("--decoder_first/last_pipeline_num_layers need pipeline stages: add pp=N to --mesh")
        return None
    return split_layers(c, spec.stage, first, last)


def build_parallel(t, c: ModelConfig, devices=None) -> Parallel:
    devices = jax.devices() if devices is None else devices
    spec = mesh_spec(t, len(devices))
    validate_layout(spec, c, t.global_batch_size, t.micro_batch_size, t.max_length)
    pipeline = _pipeline_layout(t, spec, c)
    mesh = make_mesh(spec, devices)
    sharding = Sharding(mesh, logical_rules(sequence_parallel=getattr(t, "sequence_parallel", False),
                                            ep_axes=spec.ep_axes, etp=spec.etp, pipeline=spec.stage > 1))
    specs = param_specs(c)
    pspecs = jax.tree.map(lambda s: sharding.spec(s.axes), specs, is_leaf=is_spec)
    shapes = jax.tree.map(lambda s: s.shape, specs, is_leaf=is_spec)
    is_p = lambda x: isinstance(x, P)
    param_sh = jax.tree.map(lambda p: NamedSharding(mesh, p), pspecs, is_leaf=is_p)
    # the sharded optimizer (fp32 master + Adam moments) splits over every axis a weight is replicated on
    master = jax.tree.map(lambda p, s: NamedSharding(mesh, zero_spec_all(p, s, dict(mesh.shape))),
                          pspecs, shapes, is_leaf=is_p)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs, is_leaf=is_spec)
    dispatch = None
    if spec.size > 1 and (c.num_moe_layers or c.num_nextn_predict_layers):
        dispatch = make_ep_dispatch(mesh, getattr(t, "moe_transport", "auto"),
                                    getattr(t, "moe_expert_capacity_factor", None),
                                    getattr(t, "moe_token_drop_policy", "probs"), spec.ep_axes, spec.etp,
                                    getattr(t, "moe_dispatch_buffer_factor", None),
                                    getattr(t, "moe_pad_expert_input_to_capacity", False))
    staged, storage, storage_shapes = None, master, abstract
    if pipeline is not None and "moe" in pspecs:
        staged = jax.tree.map(lambda p: NamedSharding(mesh, P("stage", *p)), pspecs["moe"], is_leaf=is_p)
        lead = (pipeline.stages, pipeline.slots)
        storage_shapes = {**abstract, "moe": jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(lead + s.shape[1:], s.dtype), abstract["moe"])}
        storage = {**master, "moe": jax.tree.map(
            lambda p, s: NamedSharding(mesh, zero_spec_all(P("stage", *p), s.shape, dict(mesh.shape))),
            pspecs["moe"], storage_shapes["moe"], is_leaf=is_p)}
    batch = BatchPlacement(NamedSharding(mesh, sharding.spec(("batch", "length_attn"))), spec.data * spec.expert,
                           spec.sequence, c.num_nextn_predict_layers, spec.describe())
    return Parallel(spec, mesh, sharding, param_sh, master, abstract, batch, dispatch, pipeline=pipeline,
                    staged_shardings=staged, storage_shardings=storage, storage_shapes=storage_shapes)
