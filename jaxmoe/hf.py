"""Public HF checkpoint API: `jaxmoe.load_pretrained(path)` and `jaxmoe.save_pretrained(model, path)`.

Both stream tensor by tensor (peak host RAM ~ a few tensors; jaxmoe/convert/hf_checkpoint.py): loading reads
each parameter block straight from the safetensors files; saving writes each HF tensor at its place in
pre-planned shards. The loaded model is the Flax module `Glm4MoeForCausalLM` (model/flax.py).
"""
from __future__ import annotations

from typing import Any

from jaxmoe.convert.hf_checkpoint import TOKENIZER_FILES, reshard_hf  # noqa: F401  (public names)
from jaxmoe.model.flax import Glm4MoeForCausalLM
from jaxmoe.model.options import ModelOptions

# `Model(config, params, state, options)` keeps its older name.
Model = Glm4MoeForCausalLM


def load_pretrained(path: str, dtype: str = "float32", shardings=None, options: ModelOptions | None = None
                    ) -> Glm4MoeForCausalLM:
    """Load a HF GLM4-MoE checkpoint dir (config.json + safetensors). `dtype` is the parameter and compute dtype.
    MTP layers are loaded when present (a config with MTP but files without it drops MTP from the config)."""
    return Glm4MoeForCausalLM.from_pretrained(path, dtype, shardings=shardings, options=options)


def save_pretrained(model: Glm4MoeForCausalLM, path: str, dtype: Any = None, max_shard_bytes: int = 5 * 1024 ** 3,
                    copy_tokenizer: bool = True) -> str:
    """Write `model` as a HF dir transformers loads unchanged: config.json, sharded safetensors + index,
    MTP layers as GLM-4.5 lays them out. dtype: default the dtype it was loaded from (bit-exact round trip)."""
    return model.save_pretrained(path, dtype, max_shard_bytes, copy_tokenizer)
