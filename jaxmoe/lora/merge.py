"""`merge-lora`: a jaxmoe LoRA checkpoint (adapters + trained extras) merged into its base model, written as a
HF dir (jaxmoe.save_pretrained) or a Megatron torch_dist checkpoint (write_mcore_dist); and adapter export to
PEFT. Register with the convert CLI as:  sub.add_parser("merge-lora", ...) -> add_merge_lora_args / merge_lora_cli.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig, load_model_config
from jaxmoe.lora.adapters import LoraConfig, merge_lora


def load_adapters(directory: str, step: int | None = None):
    """-> (model config, LoraConfig or None, adapters, extras, meta) of a jaxmoe LoRA/partial checkpoint dir."""
    from jaxmoe.lora.train import PartialTraining
    from jaxmoe.train import checkpoint as ckpt_lib
    if not ckpt_lib.is_checkpoint_dir(directory):
        raise ConfigError(f"--adapter {directory}: not a jaxmoe checkpoint dir (<dir>/<step>/ from jaxmoe.train --save)")
    meta = ckpt_lib.read_meta(directory, step)
    part = meta.get("partial")
    if not part:
        raise ConfigError(f"--adapter {directory}: a full-training checkpoint (no adapters); convert it with the "
                          "orbax converter instead")
    c = ckpt_lib.model_config_from_meta(meta)
    lc = LoraConfig.from_dict(part["lora"]) if part.get("lora") else None
    pt = PartialTraining(c, lc, list(part["extra_paths"]), 0, jnp.float32)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), pt.trainable_abstract())
    got, _, _ = ckpt_lib.restore(directory, {"params": abstract}, step, partial=True)
    tr = got["params"]
    return c, lc, tr.get("lora", {}), tr.get("extra"), meta


def base_params(model: str | None, c: ModelConfig, meta: dict):
    """(params fp32, state) of the base: a HF dir, or the preset + seed the run started from."""
    from jaxmoe.model.params import init_params, init_state
    tc = meta.get("train_config", {})
    model = model or tc.get("model")
    if model and os.path.isfile(os.path.join(model, "config.json")):
        from jaxmoe.hf import load_pretrained
        m = load_pretrained(model, dtype="float32")
        if m.config.replace(num_nextn_predict_layers=c.num_nextn_predict_layers).to_hf_dict() != c.to_hf_dict():
            raise ConfigError(f"--model {model}: its config differs from the one the adapters were trained on")
        if m.config.num_nextn_predict_layers != c.num_nextn_predict_layers:
            raise ConfigError(f"--model {model}: has no MTP weights but the adapters' model has MTP layers")
        return m.params, m.state, model
    if model is None or load_model_config(model).to_hf_dict() != c.to_hf_dict():
        raise ConfigError("--model: pass the base HF dir the adapters were trained on")
    # a preset run started from random weights: rebuild them exactly (same seed, stored in the compute dtype)
    p = init_params(c, jax.random.key(int(tc.get("seed", 42))), jnp.dtype(tc.get("dtype", "float32")))
    return jax.tree.map(lambda x: x.astype(jnp.float32), p), init_state(c), None


def merged_model(adapter_dir: str, model: str | None = None, step: int | None = None):
    from jaxmoe.hf import Model
    c, lc, lora, extras, meta = load_adapters(adapter_dir, step)
    params, state, src = base_params(model, c, meta)
    merged = merge_lora(params, lora, lc, extras) if lc is not None else \
        __import__("jaxmoe.lora.adapters", fromlist=["x"]).put_extras(params, extras or {})
    return Model(c, merged, state, source_dir=src)


def write_merged(adapter_dir: str, out: str, fmt: str = "hf", model: str | None = None, dtype: str = "bfloat16",
                 step: int | None = None) -> str:
    """Merge and write: fmt hf (safetensors dir) or mcore (torch_dist)."""
    m = merged_model(adapter_dir, model, step)
    if fmt == "hf":
        from jaxmoe.hf import save_pretrained
        return save_pretrained(m, out, dtype=np.dtype(jnp.dtype(dtype)))
    if fmt == "mcore":
        from jaxmoe.convert.hf_params import iter_hf_tensors
        from jaxmoe.convert.mcore_dist import write_mcore_dist
        host = dict(iter_hf_tensors(m.params, m.state, m.config, to_host=np.asarray))  # the merged model, once
        return write_mcore_dist(out, m.config, host.__getitem__, dtype=np.dtype(jnp.dtype(dtype)),
                                include_mtp=m.config.num_nextn_predict_layers > 0)
    if fmt == "peft":
        from jaxmoe.convert.peft_export import export_peft
        c, lc, lora, extras, meta = load_adapters(adapter_dir, step)
        if lc is None:
            raise ConfigError(f"--adapter {adapter_dir}: no LoRA adapters to export")
        return export_peft(out, lora, lc, c, extras, base_model_name_or_path=model, skip_unsupported=True)
    raise ConfigError(f"--format {fmt!r}: choose hf, mcore or peft")


def add_merge_lora_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--adapter", required=True, help="jaxmoe LoRA checkpoint dir (jaxmoe.train --train_type lora --save)")
    p.add_argument("--output", required=True, help="output dir")
    p.add_argument("--model", default=None, help="base HF dir (default: the run's --model; presets are rebuilt "
                                                 "from the run's seed)")
    p.add_argument("--format", default="hf", choices=("hf", "mcore", "peft"),
                   help="hf: merged safetensors; mcore: merged torch_dist; peft: adapters only (PEFT dir)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="dtype of the merged weights (hf, mcore outputs); router biases stay fp32. bfloat16 rounds "
                        "the merged weights; float32 keeps them as merged")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return p


def merge_lora_cli(args) -> str:
    out = write_merged(args.adapter, args.output, args.format, args.model, args.dtype, args.step)
    print(f"wrote {out}" + (f" ({args.dtype} weights; --dtype float32 keeps full precision)"
                            if args.format != "peft" and args.dtype != "float32" else ""))
    return out
