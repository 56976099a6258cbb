"""A HF GLM4-MoE checkpoint dir (config.json + safetensors) <-> jaxmoe's params / state trees.

Both directions stream tensor by tensor (peak host RAM ~ a few tensors): reading puts each parameter block
straight from the safetensors files onto its devices; writing puts each HF tensor at its place in
pre-planned shards. The public face is jaxmoe.hf (load_pretrained / save_pretrained of the Flax module).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.convert.hf_layout import hf_tensor_specs
from jaxmoe.convert.hf_params import iter_hf_tensors, mtp_duplicate_keys, params_from_hf, read_param, read_state
from jaxmoe.convert.safetensors_io import CheckpointError, HFCheckpointReader, HFCheckpointWriter
from jaxmoe.model.params import is_spec, param_specs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def _reader_getter(reader: HFCheckpointReader, c: ModelConfig):
    """`get(key)` with a clear error for a missing key, plus shape checks against the config."""
    expected = {s.key: tuple(s.shape) for s in hf_tensor_specs(c, include_mtp=True)}
    have = set(reader.keys())
    missing = sorted(k for k in expected if k not in have)
    missing = [k for k in missing if not k.startswith(tuple(
        f"model.layers.{c.num_hidden_layers + i}." for i in range(c.num_nextn_predict_layers)))] or missing
    if missing:
        raise CheckpointError(f"{reader.dir}: missing {len(missing)} tensor(s) the config needs, e.g. `{missing[0]}`"
                              "; the checkpoint does not match its config.json (or a shard is missing)")
    for k, shape in expected.items():
        if k in have and tuple(reader.spec(k).shape) != shape:
            raise CheckpointError(f"{reader.dir}: tensor `{k}` has shape {list(reader.spec(k).shape)}, the config "
                                  f"implies {list(shape)}; config.json and weights disagree")
    return lambda key: np.asarray(reader.get(key))


def _has_mtp(reader: HFCheckpointReader, c: ModelConfig) -> bool:
    if not c.num_nextn_predict_layers:
        return False
    return f"model.layers.{c.num_hidden_layers}.eh_proj.weight" in set(reader.keys())


class HFWeights(NamedTuple):
    config: ModelConfig
    params: dict
    state: dict  # the router biases
    source_dtype: Any  # the dtype of the files' weights, or None when they mix dtypes


def read_pretrained(path: str, dtype: Any = "float32", shardings=None) -> HFWeights:
    """Read a HF GLM4-MoE checkpoint dir; `dtype` is the parameters' dtype, `shardings` their NamedShardings
    (each device reads its own block). MTP layers are read when present (a config with MTP but files without
    it drops MTP from the config)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path}: no config.json; expected a HF checkpoint directory")
    c = ModelConfig.from_json_file(cfg_path)
    reader = HFCheckpointReader(path)
    if c.num_nextn_predict_layers and not _has_mtp(reader, c):
        c = c.replace(num_nextn_predict_layers=0)  # transformers-saved dirs carry no MTP weights
    get = _reader_getter(reader, c)
    for dup, main in mtp_duplicate_keys(c).items():
        if dup in set(reader.keys()) and not np.array_equal(get(dup), get(main)):
            raise CheckpointError(f"{path}: `{dup}` differs from `{main}`; jaxmoe shares the MTP embedding/head "
                                  "with the main model")
    params, state = params_from_hf(get, c, dtype=jnp.dtype(dtype), shardings=shardings)
    src = {reader.spec(k).dtype for k in reader.keys() if "e_score" not in k}
    return HFWeights(c, params, state, src.pop() if len(src) == 1 else None)


def write_pretrained(c: ModelConfig, params: dict, state: dict, path: str, dtype: Any,
                     max_shard_bytes: int = 5 * 1024 ** 3, tokenizer_dir: str | None = None) -> str:
    """Write a HF dir transformers loads unchanged: config.json, sharded safetensors + index, MTP layers as
    GLM-4.5 lays them out, weights in `dtype` (router biases fp32), the tokenizer files of `tokenizer_dir`."""
    dt = np.dtype(dtype)
    specs = hf_tensor_specs(c, include_mtp=True, mtp_shared=True)
    manifest = [(s.key, s.shape, np.float32 if "e_score" in s.key else dt) for s in specs]
    writer = HFCheckpointWriter(path, manifest, max_shard_bytes=max_shard_bytes)
    try:
        for key, value in iter_hf_tensors(params, state, c, to_host=jax.device_get):
            writer.write(key, np.asarray(value).astype(np.float32 if "e_score" in key else dt))
        final = writer.close()
    except BaseException:
        writer.abort()
        raise
    c.save_json(os.path.join(final, "config.json"))
    for f in (f for f in TOKENIZER_FILES if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, f))):
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(final, f))
    return final


class _LazyParam:
    """A jaxmoe parameter read from HF tensors on demand: `p[l]` is layer l, and for routed experts `p[l][e]`
    reads expert e alone, so streaming conversions hold one expert matrix at a time."""

    def __init__(self, path: str, shape: tuple[int, ...], c: ModelConfig, get, prefix: tuple = ()):
        self.path, self.shape, self.c, self.get, self.prefix = path, shape, c, get, prefix

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if isinstance(idx[0], int) and self.path.endswith(("experts_wi", "experts_wo")) and len(self.prefix) < 2:
            sub = _LazyParam(self.path, self.shape[1:], self.c, self.get, self.prefix + (idx[0],))
            return sub if len(idx) == 1 else sub.__array__()[idx[1:]]
        return self.__array__()[idx]

    def __array__(self, dtype=None, copy=None):
        index = tuple(slice(i, i + 1) for i in self.prefix) or None
        v = read_param(self.path, self.c, self.get, index)
        v = v.reshape(v.shape[len(self.prefix):]) if self.prefix else v
        return v if dtype is None else v.astype(dtype)


def lazy_params(c: ModelConfig, get) -> dict:
    """Params-shaped tree of _LazyParam (nothing read until indexed)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(c), is_leaf=is_spec)
    leaves = [_LazyParam("/".join(str(getattr(k, "key", k)) for k in path), spec.shape, c, get)
              for path, spec in flat]
    return jax.tree.unflatten(treedef, leaves)


def reshard_hf(src: str, dst: str, dtype: Any = None, max_shard_bytes: int = 5 * 1024 ** 3) -> str:
    """Rewrite a HF GLM4-MoE checkpoint through the jaxmoe parameter layout, tensor by tensor (peak host RAM
    about one expert matrix): re-shard, cast (e.g. to bfloat16) and add the MTP embedding/head copies."""
    c = ModelConfig.from_json_file(os.path.join(src, "config.json"))
    reader = HFCheckpointReader(src)
    if c.num_nextn_predict_layers and not _has_mtp(reader, c):
        c = c.replace(num_nextn_predict_layers=0)
    get = _reader_getter(reader, c)
    dt = np.dtype(dtype) if dtype is not None else None
    specs = hf_tensor_specs(c, include_mtp=True, mtp_shared=True)
    src_dt = {s.key: reader.spec(s.key).dtype for s in specs if s.key in set(reader.keys())}
    main_dt = {"model.embed_tokens.weight": src_dt.get("model.embed_tokens.weight"),
               "lm_head.weight": src_dt.get("lm_head.weight")}
    dup = mtp_duplicate_keys(c)

    def out_dtype(key):
        if "e_score" in key:
            return np.float32
        return dt or src_dt.get(key) or main_dt[dup[key]]

    manifest = [(s.key, s.shape, out_dtype(s.key)) for s in specs]
    writer = HFCheckpointWriter(dst, manifest, max_shard_bytes=max_shard_bytes)
    try:
        for key, value in iter_hf_tensors(lazy_params(c, get), read_state(c, get), c, to_host=np.asarray):
            writer.write(key, np.asarray(value).astype(out_dtype(key)))
        final = writer.close()
    except BaseException:
        writer.abort()
        raise
    c.save_json(os.path.join(final, "config.json"))
    return final
