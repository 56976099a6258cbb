"""`Glm4MoeForCausalLM`: the GLM4-MoE model as a Flax NNX module, a face over the functional engine.

Every tensor of the parameter table (model/params.py) is an `nnx.Param` carrying its logical axes as
`out_sharding` metadata, the layer stacks keep their leading `layers` axis (the trainer scans them), and
the router correction bias is its own non-trainable Variable kind (`RouterBias`). `__call__` runs the very
forward the trainer uses (model/transformer.py), so

    nnx.to_pure_dict(nnx.state(model, nnx.Param)) == the params tree of jaxmoe.train (train_state["params"])
    nnx.to_pure_dict(nnx.state(model, RouterBias)) == train_state["model_state"]

    model = Glm4MoeForCausalLM.from_pretrained("path/to/hf_dir")      # streaming, like jaxmoe.load_pretrained
    with nnx.logical_axis_rules(flax_rules()):                         # logical axes -> mesh axes
        specs = nnx.get_partition_spec(nnx.state(model))
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.convert.hf_checkpoint import read_pretrained, write_pretrained
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.params import init_params, init_state, logical_axes, param_shapes
from jaxmoe.model.transformer import batch_logits
from jaxmoe.sharding import logical_rules

_batch_logits = jax.jit(batch_logits, static_argnums=(3, 4))


class RouterBias(nnx.Variable):
    """The router correction bias (`e_score_correction_bias`), [L, E] fp32: model state updated by the
    loss-free balancing rule outside the optimizer, so it is neither an nnx.Param nor trained by optax."""


def flax_rules(sequence_parallel: bool = False) -> list[tuple[str, Any]]:
    """jaxmoe's logical-axis table (jaxmoe/sharding.py) as Flax `logical_axis_rules` pairs."""
    return list(logical_rules(sequence_parallel).items())


class Glm4MoeForCausalLM(nnx.Module):
    """GLM4-MoE (HF Glm4MoeForCausalLM): `model(input_ids)` -> logits [B, T, vocab] (fp32).

    Built from the parameter table: random init like HF (`rngs`, `dtype`), or the given `params` / `state`
    trees (jaxmoe's layout, e.g. a train state's "params" / "model_state")."""

    def __init__(self, config: ModelConfig, params: dict | None = None, state: dict | None = None,
                 options: ModelOptions | None = None, *, rngs: nnx.Rngs | None = None, dtype: Any = jnp.float32,
                 source_dir: str | None = None, source_dtype: Any = None):
        self.config = config
        self.options = options or ModelOptions(compute_dtype=str(jnp.dtype(dtype)))
        self.source_dir, self.source_dtype = source_dir, source_dtype  # for save_pretrained (dtype, tokenizer)
        if params is None:
            params = init_params(config, (rngs or nnx.Rngs(0)).params(), jnp.dtype(dtype))
        state = init_state(config) if state is None else state
        # eager_sharding off: values keep the placement they come with (load_pretrained's shardings, or none)
        tree = jax.tree.map(lambda v, axes: nnx.Param(v, out_sharding=axes, eager_sharding=False),
                            params, logical_axes(config))
        for name, sub in tree.items():
            setattr(self, name, nnx.data(sub))
        for name, v in state.items():
            setattr(self, name, RouterBias(v))

    @property
    def params(self) -> dict:
        """The weights as jaxmoe's plain params tree."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    @property
    def state(self) -> dict:
        """The router biases as jaxmoe's model-state tree ({'moe_bias': [L, E], 'mtp_bias': ...})."""
        return nnx.to_pure_dict(nnx.state(self, RouterBias))

    def __call__(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
        """input_ids [B, T] or [T] -> logits [B, T, vocab] fp32. positions default 0..T-1; segment_ids (packed
        sequences, 0 = padding) default one segment per row. Works eagerly and under nnx.jit."""
        ids = _rows(input_ids)
        if not isinstance(ids, jax.core.Tracer) and ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}); got values in [{lo}, {hi}]")
        B, T = ids.shape
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if positions is None else _rows(positions)
        seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else _rows(segment_ids)
        batch = {"input_ids": ids, "positions": pos, "segment_ids": seg}
        return _batch_logits(self.params, self.state, batch, self.config, self.options)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", shardings=None,
                        options: ModelOptions | None = None) -> "Glm4MoeForCausalLM":
        """A HF checkpoint dir, streamed tensor by tensor. `dtype`: the parameter and compute dtype;
        `shardings`: the params' NamedShardings (each device reads its own block)."""
        w = read_pretrained(path, dtype, shardings)
        opts = options or ModelOptions(compute_dtype=str(jnp.dtype(dtype)))
        return cls(w.config, w.params, w.state, opts, source_dir=str(path), source_dtype=w.source_dtype)

    @classmethod
    def from_train_checkpoint(cls, directory: str, step: int | None = None,
                              options: ModelOptions | None = None) -> "Glm4MoeForCausalLM":
        """The fp32 weights and router biases of a jaxmoe.train checkpoint (`--save` dir, orbax; latest step by
        default): its train_state["params"] and ["model_state"]. Only those two subtrees are read."""
        from jaxmoe.train import checkpoint as ckpt  # orbax on first use: HF loading and inference need none
        meta = ckpt.read_meta(directory, step)
        if meta.get("partial"):
            raise ConfigError(f"{directory}: a LoRA / partial-training checkpoint holds the trainable part only; "
                              "merge it first (python -m jaxmoe.convert merge-lora --adapter DIR --output HF_DIR) "
                              "and load that with from_pretrained")
        c = ckpt.model_config_from_meta(meta)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                                {"params": param_shapes(c), "model_state": jax.eval_shape(lambda: init_state(c))})
        got, _, _ = ckpt.restore(directory, abstract, step, partial=True)
        return cls(c, got["params"], got["model_state"], options)

    def save_train_checkpoint(self, directory: str, step: int = 0) -> str:
        """Write the weights (fp32) and router biases as a weights-only jaxmoe.train checkpoint at
        <directory>/<step>/, which `python -m jaxmoe.train --load DIR --finetune` starts from."""
        from jaxmoe.train import checkpoint as ckpt  # orbax on first use: HF loading and inference need none
        meta = {"model_config": self.config.to_hf_dict(), "iteration": step, "consumed_samples": 0,
                "weights_only": True}
        params = jax.tree.map(lambda a: a.astype(jnp.float32), self.params)  # the trainer's master dtype
        saver = ckpt.Checkpointer(directory, async_save=False)
        try:
            saver.save(step, {"params": params, "model_state": self.state}, None, meta)
        finally:
            saver.close()
        return saver.directory

    def save_pretrained(self, path: str, dtype: Any = None, max_shard_bytes: int = 5 * 1024 ** 3,
                        copy_tokenizer: bool = True) -> str:
        """Write a HF dir transformers loads unchanged (config.json, sharded safetensors, MTP layers as GLM-4.5
        lays them out); returns its path. dtype: default the dtype it was loaded from (bit-exact round trip)."""
        dt = dtype if dtype is not None else self.source_dtype or jax.tree.leaves(self.params)[0].dtype
        return write_pretrained(self.config, self.params, self.state, path, dt, max_shard_bytes,
                                self.source_dir if copy_tokenizer else None)


def _rows(x) -> jax.Array:
    x = jnp.asarray(x, jnp.int32)
    return x[None] if x.ndim == 1 else x
