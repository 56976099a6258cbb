"""The one builder of the train and eval steps, used by the trainer (train/loop.py), the benchmarks
(jaxmoe.perf.TrainStep) and the ahead-of-time GPU compiler (jaxmoe.aot), so all three run the same program.

    built = build_step(t, c, par, train_iters)        # full training, LoRA or frozen parameters
    built.step(train_state, batch, frozen)            # jitted, train state donated
    built.abstract_state(), built.abstract_frozen()   # sharded shape structs: compile without weights

The target platform comes from the mesh's devices, not from the running backend: on compile-only GPU devices
(jaxmoe.aot) the step is built exactly as on a GPU (Pallas kernels compiled, the ragged expert exchange).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.lora.train import PartialTraining
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.params import init_params, init_state
from jaxmoe.sharding import Sharding
from jaxmoe.train.args import TrainConfig
from jaxmoe.train.loss import LossOptions
from jaxmoe.train.optimizer import lr_schedule, make_optimizer
from jaxmoe.train.step import StepConfig, StepHooks, init_train_state, make_eval_step, make_train_step


def mesh_platform(par) -> str:
    """'gpu' or 'cpu': the platform of the devices the step is compiled for."""
    return par.mesh.devices.flat[0].platform


def model_options(t: TrainConfig, platform: str | None = None, sharding: Sharding = Sharding()) -> ModelOptions:
    """ModelOptions of a run; `platform` (default: the running backend) decides what `--kernels auto` means;
    `sharding`: the layout's (Parallel.sharding), none for one device."""
    platform = platform or jax.default_backend()
    kernels = t.kernels
    if kernels == "auto" and platform == "cpu":
        kernels = "reference"  # Pallas kernels run in interpret mode only, far too slow for training on CPU
    return ModelOptions(compute_dtype=t.dtype, kernels=kernels, remat=t.recompute_granularity or "none",
                        remat_modules=tuple(t.recompute_modules), platform=platform, sharding=sharding)


def micro_batches(t: TrainConfig, par) -> int:
    """Micro-batches per step and data rank; the global batch must split evenly."""
    dp = par.data_parallel_size
    n = t.global_batch_size // (t.micro_batch_size * dp)
    if n * t.micro_batch_size * dp != t.global_batch_size:
        raise ConfigError(f"--global_batch_size {t.global_batch_size} must be a multiple of --micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({dp})")
    return n


@dataclasses.dataclass
class BuiltStep:
    t: TrainConfig
    c: ModelConfig
    par: Any  # parallel.setup.Parallel
    opts: ModelOptions
    lo: LossOptions
    optimizer: optax.GradientTransformation
    schedule: Callable
    num_micro: int
    ptrain: Any  # lora.train.PartialTraining or None (full training)
    step_fn: Callable  # the un-jitted step(train_state, batch, frozen=None)
    eval_fn: Callable  # the un-jitted eval(params, model_state, batch, frozen=None)

    @functools.cached_property
    def step(self):
        return jax.jit(self.step_fn, donate_argnums=0)

    @functools.cached_property
    def eval(self):
        return jax.jit(self.eval_fn)

    def state_shardings(self, canonical: bool = False):
        """The train state's shardings; `canonical`: the checkpoint's layout (differs under the pipeline, where
        full training stores the MoE stack staged: Parallel.storage_shardings)."""
        if self.ptrain is None:
            return self.par.state_shardings(self.optimizer, canonical)
        return self.ptrain.state_shardings(self.par, self.optimizer)

    def to_storage(self, state):
        """A (part of a) train state restored from a checkpoint -> the layout the step takes."""
        return self.par.to_storage(state, self.optimizer) if self.ptrain is None else state

    def to_checkpoint(self, state, memory_kind: str | None = None):
        """The train state (or a part of it) -> the checkpoint's layout (Parallel.to_checkpoint)."""
        return self.par.to_checkpoint(state, self.optimizer, memory_kind) if self.ptrain is None else state

    def abstract_state(self, canonical: bool = False):
        """The train state as sharded shape structs (nothing allocated); `canonical`: the checkpoint's layout."""
        if self.ptrain is None:
            stage = (lambda p: p) if canonical else self.par.stage_params
            trainable = lambda: stage(init_params(self.c, jax.random.key(0)))
        else:
            trainable = lambda: self.ptrain.init_trainable(
                jax.eval_shape(lambda: init_params(self.c, jax.random.key(0), self.t.dtype)), jax.random.key(0))
        shapes = jax.eval_shape(lambda: init_train_state(trainable(), init_state(self.c), self.optimizer))
        # state_shardings is a prefix tree (one sharding for the whole model_state dict)
        return jax.tree.map(lambda sh, sub: jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sub), self.state_shardings(canonical), shapes)

    def abstract_frozen(self):
        """The frozen base of partial training (compute dtype, TP/EP layout) as shape structs; None for full."""
        if self.ptrain is None:
            return None
        shapes = self.par.param_shapes
        if self.par.pipeline is not None:  # the frozen MoE stack is kept staged (Parallel.stage_frozen)
            shapes = {**shapes, "moe": jax.eval_shape(lambda m: jax.tree.map(self.par.pipeline.to_stages, m),
                                                      shapes["moe"])}
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, self.opts.dtype, sharding=sh),
                            shapes, self.par.frozen_shardings)


def build_step(t: TrainConfig, c: ModelConfig, par, train_iters: int, ptrain=None) -> BuiltStep:
    """`ptrain`: the run's lora.train.PartialTraining when the caller already made it (default: from t)."""
    opts = model_options(t, mesh_platform(par), par.sharding)
    ptrain = ptrain or PartialTraining.from_train_config(t, c)
    optimizer = make_optimizer(t, train_iters)
    schedule = lr_schedule(t, train_iters)
    num_micro = micro_batches(t, par)
    pipe = par.pipeline
    if pipe is not None and par.spec.tensor > 1 and t.sequence_parallel and num_micro <= pipe.stages:
        # XLA's SPMD partitioner aborts on this program (docs/parallelism.md, known gaps)
        raise ConfigError(f"--global_batch_size {t.global_batch_size}: {num_micro} micro-batch(es) for {pipe.stages} "
                          "pipeline stages with tensor and sequence parallelism; use more micro-batches than stages "
                          "(a larger --global_batch_size or a smaller --micro_batch_size)")
    mtp_layers = c.num_nextn_predict_layers if t.mtp_num_layers is None else t.mtp_num_layers
    lo = LossOptions(mtp_layers=mtp_layers, mtp_scale=t.mtp_loss_scaling_factor, aux_coeff=t.moe_aux_loss_coeff)
    hooks = StepHooks.for_layout(par, **(ptrain.make_hooks(par) if ptrain is not None else {}))
    bias_rate = t.moe_router_bias_update_rate if t.train_type == "full" else 0.0  # frozen under LoRA
    sc = StepConfig(lo, optimizer, schedule, num_micro, t.clip_grad, bias_rate)
    step_fn = make_train_step(c, opts, sc, hooks)
    # evaluation has no re-run on overflow (train/loop.py): worst-case expert-parallel buffers (no backward)
    if getattr(par.dispatch, "bounded", False):
        hooks = dataclasses.replace(hooks, dispatch=par.dispatch.worst_case())
    eval_fn = make_eval_step(c, opts, hooks, num_micro)
    return BuiltStep(t, c, par, opts, lo, optimizer, schedule, num_micro, ptrain, step_fn, eval_fn)
