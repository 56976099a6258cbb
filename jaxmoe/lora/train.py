"""Partial training over a frozen base: LoRA adapters plus optional fully-trained extras (--modules_to_save,
--trainable_parameters), or full training minus --freeze_parameters.

The train state holds only the trainable tree {"lora": adapters, "extra": chosen base params} (fp32 master +
AdamW moments); the frozen base is a separate argument of the step, kept in the compute dtype in the TP/EP
layout, with no gradient, no optimizer state and no fp32 copy. Checkpoints therefore hold only the trainable
tree (plus router bias / counters) and the config.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.lora.adapters import (LoraConfig, attach, dropout_keys, get_extras, init_lora, lora_specs, put_extras,
                                  select_extras)
from jaxmoe.model.params import is_spec, param_shapes
from jaxmoe.train import checkpoint as ckpt_lib
from jaxmoe.train.step import init_train_state


@dataclasses.dataclass
class PartialTraining:
    c: ModelConfig
    lc: LoraConfig | None  # None: no adapters (full training with frozen parameters)
    extra_paths: list[str]
    seed: int
    dtype: Any  # compute dtype (and the frozen base's storage dtype)

    @classmethod
    def from_train_config(cls, t, c: ModelConfig) -> "PartialTraining | None":
        lora = t.train_type == "lora"
        if not lora and not t.freeze_parameters and not t.trainable_parameters:
            return None
        if not lora and t.modules_to_save:
            raise ConfigError("--modules_to_save is for --train_type lora (full training trains every module)")
        lc = LoraConfig.from_train_config(t) if lora else None
        extra = select_extras(c, t.modules_to_save, t.trainable_parameters, t.freeze_parameters, everything=not lora)
        if not lora and not extra:
            raise ConfigError("--freeze_parameters freezes every parameter; nothing would be trained")
        if lc is not None:
            lora_specs(c, lc)  # validates the targets against the model
        return cls(c, lc, extra, t.seed, jnp.dtype(t.dtype))

    def meta(self) -> dict:
        return {"lora": self.lc.to_dict() if self.lc else None, "extra_paths": list(self.extra_paths)}

    # ---- layouts ---------------------------------------------------------------------------------------
    def trainable_shardings(self, par) -> dict:
        out: dict = {}
        if self.lc is not None:  # fp32 adapters + Adam moments: ZeRO-1 over the axes they are replicated on
            out["lora"] = jax.tree.map(lambda s: par.zero_sharding(par.sharding.spec(s.axes), s.shape),
                                       lora_specs(self.c, self.lc), is_leaf=is_spec)
        if self.extra_paths:
            out["extra"] = get_extras(par.master_shardings, self.extra_paths)
        return out

    def compute_shardings(self, par) -> dict:
        out = dict(self.trainable_shardings(par))
        if self.lc is not None:
            out["lora"] = jax.tree.map(lambda s: NamedSharding(par.mesh, par.sharding.spec(s.axes)),
                                       lora_specs(self.c, self.lc), is_leaf=is_spec)
        if self.extra_paths:
            out["extra"] = get_extras(par.param_shardings, self.extra_paths)
        return out

    def trainable_abstract(self, par=None) -> dict:
        out: dict = {}
        if self.lc is not None:
            out["lora"] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                       lora_specs(self.c, self.lc), is_leaf=is_spec)
        if self.extra_paths:
            out["extra"] = get_extras(param_shapes(self.c), self.extra_paths)
        if par is not None:
            out = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), out,
                               self.trainable_shardings(par))
        return out

    def state_shardings(self, par, optimizer) -> dict:
        return par.state_shardings_of(optimizer, self.trainable_shardings(par), self.trainable_abstract())

    # ---- state -----------------------------------------------------------------------------------------
    def init_trainable(self, base: dict, key: jax.Array) -> dict:
        out: dict = {}
        if self.lc is not None:
            out["lora"] = init_lora(self.c, self.lc, key)
        if self.extra_paths:
            out["extra"] = jax.tree.map(lambda x: x.astype(jnp.float32), get_extras(base, self.extra_paths))
        return out

    def init_train_state(self, base: dict, model_state: dict, optimizer, par) -> dict:
        """(train state of the trainable tree) from the frozen base (compute dtype, param_shardings)."""
        key = jax.random.fold_in(jax.random.key(self.seed), 0x10A)
        return jax.jit(lambda b, s: init_train_state(self.init_trainable(b, key), s, optimizer),
                       out_shardings=self.state_shardings(par, optimizer))(base, model_state)

    # ---- step hooks ------------------------------------------------------------------------------------
    def make_hooks(self, par) -> dict:
        """The partial-training fields of train.step.StepHooks: compute_params, grad_transform, combine (and
        adapt under the pipeline), param_shardings, frozen_shardings."""
        self._check_layout(par)
        master_sh, comp_sh = self.trainable_shardings(par), self.compute_shardings(par)
        wsc = jax.lax.with_sharding_constraint
        pipe = par.pipeline
        keyed = self.lc is not None and self.lc.dropout > 0

        def compute_params(tr, dtype):
            # adapters stay fp32 until `attach` has scaled B; extras are cast like full-training params
            out = {k: v for k, v in tr.items()}
            if "extra" in tr:
                out["extra"] = jax.tree.map(lambda x: x.astype(dtype), tr["extra"])
            return jax.tree.map(wsc, out, comp_sh)

        def grad_transform(g):
            return jax.tree.map(wsc, g, master_sh)

        def micro_key(iteration, micro):
            return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), iteration), micro)

        def combine(tr, frozen, iteration=None, micro=None):
            # under the pipeline the weights stay fp32 here (each stage call casts them: fp32 gradient sums)
            full = put_extras(frozen, tr["extra"], None if pipe else self.dtype) if "extra" in tr else frozen
            if self.lc is None:
                return full
            lora = tr["lora"]
            if pipe is not None and "moe" in lora:
                lora = {**lora, "moe": jax.tree.map(pipe.to_stages, lora["moe"])}
            key = micro_key(iteration, micro) if iteration is not None and keyed and pipe is None else None
            return attach(full, lora, self.lc, jnp.float32 if pipe else self.dtype, key)

        def adapt(tree, iteration, micro, moe_layer_ids):
            return dropout_keys(tree, self.lc, micro_key(iteration, micro), moe_layer_ids)

        return dict(compute_params=compute_params, grad_transform=grad_transform, combine=combine,
                    adapt=adapt if pipe is not None and keyed else None, param_shardings=comp_sh,
                    frozen_shardings=par.frozen_shardings)

    def _check_layout(self, par):
        experts = self.lc is not None and any(u.startswith("experts_") for u in self.lc.units())
        if experts and par.dispatch is not None and "lora" not in inspect.signature(par.dispatch).parameters:
            raise ConfigError(f"--mesh {par.describe()}: the expert-parallel dispatch does not carry LoRA adapters "
                              "of routed experts yet; use ep=1, or --target_modules without routed experts "
                              "(e.g. linear_qkv linear_proj shared_experts)")
        if experts and par.spec.etp > 1:
            raise ConfigError(f"--expert_tensor_parallel_size {par.spec.etp}: LoRA adapters of routed experts need "
                              "expert tensor parallel size 1; use 1, or --target_modules without routed experts")
        staged = [p for p in self.extra_paths if p.startswith("moe/")]
        if par.pipeline is not None and staged:
            raise ConfigError(f"--mesh {par.describe()}: training parameters of the pipelined MoE layer stack "
                              f"({staged[0]}, ...) besides LoRA adapters is not supported under pipeline "
                              "parallelism yet; freeze them (--modules_to_save / --trainable_parameters / "
                              "--freeze_parameters) or use pp=1")

    # ---- checkpoints -----------------------------------------------------------------------------------
    def load_adapters(self, directory: str, ts: dict, par) -> dict:
        """ts with its trainable tree replaced by the one saved in a jaxmoe LoRA checkpoint (--adapter_load)."""
        if not ckpt_lib.is_checkpoint_dir(directory):
            raise ConfigError(f"--adapter_load {directory}: not a jaxmoe checkpoint dir (<dir>/<step>/ written by "
                              "jaxmoe.train --train_type lora --save)")
        meta = ckpt_lib.read_meta(directory)
        saved = meta.get("partial") or {}
        if saved.get("lora") != self.meta()["lora"] or saved.get("extra_paths") != self.meta()["extra_paths"]:
            raise ConfigError(f"--adapter_load {directory}: saved with LoRA {saved.get('lora')} and extras "
                              f"{saved.get('extra_paths')}, this run has {self.meta()['lora']} and extras "
                              f"{self.extra_paths}; match --lora_rank/--target_modules/--modules_to_save")
        saved_cfg = ckpt_lib.model_config_from_meta(meta)
        if saved_cfg.to_hf_dict() != self.c.to_hf_dict():
            raise ConfigError(f"--adapter_load {directory}: its model config differs from --model's")
        got, _, _ = ckpt_lib.restore(directory, {"params": self.trainable_abstract(par)}, partial=True)
        return {**ts, "params": got["params"]}
