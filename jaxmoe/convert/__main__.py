"""`python -m jaxmoe.convert <direction> --input SRC --output DST [...]`: checkpoint conversion CLI.

Directions connect HF safetensors dirs, jaxmoe.train orbax checkpoints and Megatron-Core torch_dist
(plus the legacy torch format as a source). Every direction validates its whole input (files, keys,
shapes against the model config) and its output path before it writes anything, streams tensor by
tensor, and publishes the output only when complete. Bad input: one message, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import Callable

import numpy as np

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.convert.hf_layout import check_hf_keys, hf_tensor_specs
from jaxmoe.convert.mcore_layout import padded_vocab_size
from jaxmoe.convert.safetensors_io import HFCheckpointReader, HFCheckpointWriter

# The format modules that pull in torch (mcore_dist, mcore_legacy), tensorstore (orbax_io) or jax (hf, hf_params,
# verify, lora.merge) are imported inside the directions that use them: `--help` and a bad flag answer at once.

DIRECTIONS = ("hf-to-orbax", "orbax-to-hf", "hf-to-mcore", "mcore-to-hf", "mcore-to-orbax", "orbax-to-mcore",
              "legacy-to-hf", "hf-reshard")


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1048576' -> bytes (decimal units for GB/MB/KB, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max_shard_size {text!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    mult = {"B": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
            "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ConfigError(f"--max_shard_size {text!r} must be positive")
    return n


def parse_dtype(name: str | None):
    if name is None:
        return None
    import ml_dtypes
    table = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
             "float16": np.float16, "fp16": np.float16}
    if name not in table:
        raise ConfigError(f"--dtype {name!r}: choose one of float32, bfloat16, float16")
    return np.dtype(table[name])


# ---- model config from Megatron args ---------------------------------------------------------------
def _first_dense(freq, n_layers: int, where: str) -> int:
    """Megatron moe_layer_freq (int, list, or '[0]*1+[1]*45' string) -> first_k_dense_replace."""
    if isinstance(freq, str):
        terms = re.findall(r"\[\s*([01])\s*\]\s*\*\s*(\d+)", freq)
        if not terms or re.sub(r"[\s()]", "", freq) != "+".join(f"[{a}]*{b}" for a, b in terms):
            raise ConfigError(f"{where}: moe_layer_freq {freq!r} is not of the form '[0]*K+[1]*N'")
        freq = [int(a) for a, b in terms for _ in range(int(b))]
    if isinstance(freq, int):
        if freq != 1:
            raise ConfigError(f"{where}: moe_layer_freq={freq}: GLM4-MoE needs every layer after the dense "
                              "ones to be MoE (a list [0]*K+[1]*N)")
        return 0
    freq = list(freq)
    k = next((i for i, v in enumerate(freq) if v), len(freq))
    if len(freq) != n_layers or any(v != 1 for v in freq[k:]):
        raise ConfigError(f"{where}: moe_layer_freq {freq} must be {n_layers} entries: K zeros then ones "
                          "(GLM4-MoE's first_k_dense_replace)")
    return k


def config_from_megatron_args(args, where: str) -> ModelConfig:
    """ModelConfig from the args Namespace Megatron / Megatron-SWIFT store in common.pt."""
    if args is None:
        raise ConfigError(f"{where}: the checkpoint stores no args; pass --config config.json")
    a = vars(args) if not isinstance(args, dict) else args

    def need(k):
        if a.get(k) is None:
            raise ConfigError(f"{where}: args has no `{k}`; pass --config config.json with the model config")
        return a[k]

    L, H, nh = int(need("num_layers")), int(need("hidden_size")), int(need("num_attention_heads"))
    E = int(a.get("num_experts") or 0)
    moe_f = int(a.get("moe_ffn_hidden_size") or need("ffn_hidden_size"))
    shared = a.get("moe_shared_expert_intermediate_size")
    if shared and shared % moe_f:
        raise ConfigError(f"{where}: moe_shared_expert_intermediate_size {shared} is not a multiple of "
                          f"moe_ffn_hidden_size {moe_f}")
    if a.get("untie_embeddings_and_output_weights") is False:
        raise ConfigError(f"{where}: untie_embeddings_and_output_weights=False; GLM4-MoE has an untied LM head")
    if a.get("moe_router_score_function", "sigmoid") not in ("sigmoid", None):
        raise ConfigError(f"{where}: moe_router_score_function={a['moe_router_score_function']!r}; GLM4-MoE "
                          "routes with sigmoid scores")
    vocab = a.get("vocab_size") or need("padded_vocab_size")
    kw = dict(
        vocab_size=int(vocab), hidden_size=H, intermediate_size=int(need("ffn_hidden_size")),
        moe_intermediate_size=moe_f, num_hidden_layers=L, num_attention_heads=nh,
        num_key_value_heads=int(a.get("num_query_groups") or nh) if a.get("group_query_attention", True) else nh,
        head_dim=int(a.get("kv_channels") or H // nh), rms_norm_eps=float(a.get("norm_epsilon") or 1e-5),
        rope_theta=float(a.get("rotary_base") or 10000), partial_rotary_factor=float(a.get("rotary_percent") or 1.0),
        max_position_embeddings=int(a.get("max_position_embeddings") or 4096),
        attention_bias=bool(a.get("add_qkv_bias", False)), use_qk_norm=bool(a.get("qk_layernorm", False)),
        n_routed_experts=E or 1, n_shared_experts=(shared // moe_f) if shared else 0,
        num_experts_per_tok=int(a.get("moe_router_topk") or 1), n_group=int(a.get("moe_router_num_groups") or 1),
        topk_group=int(a.get("moe_router_group_topk") or 1),
        routed_scaling_factor=float(a.get("moe_router_topk_scaling_factor") or 1.0),
        first_k_dense_replace=_first_dense(a.get("moe_layer_freq", 1), L, where) if E else L,
        num_nextn_predict_layers=int(a.get("mtp_num_layers") or 0), tie_word_embeddings=False)
    return ModelConfig(**kw).validate(f"{where} (model config from Megatron args)")


# ---- progress ---------------------------------------------------------------------------------
class Progress:
    """tqdm over bytes (to stderr; quiet with --quiet)."""

    def __init__(self, total: int, desc: str, quiet: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=quiet, file=sys.stderr,
                        mininterval=0.5)

    def __call__(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def _cfg_total_bytes(cfg: ModelConfig, itemsize: int) -> int:
    from jaxmoe.model.params import count_params
    return count_params(cfg) * itemsize


# ---- inputs ---------------------------------------------------------------------------------------
def _load_config_flag(ns) -> ModelConfig | None:
    return ModelConfig.from_json_file(ns.config) if ns.config else None


def open_hf(path: str, ns):
    """-> (reader, cfg, has_mtp) of a validated HF dir."""
    if not os.path.isdir(path):
        raise ConfigError(f"--input {path}: not a directory; expected a HF checkpoint dir (config.json + safetensors)")
    if not ns.config and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--input {path}: no config.json; not a HF checkpoint dir (or pass --config config.json)")
    cfg = _load_config_flag(ns) or ModelConfig.from_json_file(os.path.join(path, "config.json"))
    r = HFCheckpointReader(path)
    info = check_hf_keys(cfg, r.shapes(), path)
    if not info["mtp"] or ns.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return r, cfg, info["mtp"] and not ns.no_mtp


def open_mcore(path: str, ns):
    """-> (reader, cfg) of a validated torch_dist checkpoint (config from --config or common.pt args)."""
    from jaxmoe.convert.mcore_dist import McoreDistReader
    r = McoreDistReader(path, ns.iteration)
    cfg = _load_config_flag(ns) or config_from_megatron_args(r.args, f"{r.dir}/common.pt")
    r.plan(cfg)
    if not r.has_mtp():
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return r, cfg


def open_orbax(path: str, ns):
    from jaxmoe.convert.orbax_io import OrbaxCheckpointReader
    return OrbaxCheckpointReader(path, ns.iteration, cfg=_load_config_flag(ns))


def check_output(path: str, kind: str) -> None:
    """Refuse an output that would mix with existing files, before any reading or writing."""
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"--output {path}: parent directory {parent} does not exist")
        return
    if not os.path.isdir(path):
        raise ConfigError(f"--output {path}: exists and is not a directory")
    if kind == "mcore":
        return  # a Megatron root may hold other iterations; the writer refuses an existing iteration dir
    if os.listdir(path):
        raise ConfigError(f"--output {path}: directory is not empty; choose a new or empty directory")


# ---- outputs ------------------------------------------------------------------------------------------
def with_mtp_copies(items, copies: dict[str, str]):
    """(key, array) pairs plus GLM-4.5's MTP copies of the embedding / lm_head (`copies`: copy key -> main
    key), which the released checkpoints carry and serving engines load for MTP."""
    of_main: dict[str, list[str]] = {}
    for copy, main in copies.items():
        of_main.setdefault(main, []).append(copy)
    for k, a in items:
        yield k, a
        for copy in of_main.get(k, ()):
            yield copy, a


def write_hf(out: str, cfg: ModelConfig, manifest: list, items, ns, tokenizer_src: str | None = None) -> str:
    """Stream (key, array) pairs into a HF dir with config.json and tokenizer files; all or nothing."""
    from jaxmoe.hf import TOKENIZER_FILES
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    dts = {k: np.dtype(dt) for k, _, dt in manifest}
    prog = Progress(sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in manifest), "hf", ns.quiet)
    try:
        cfg.save_json(os.path.join(out, "config.json"))
        if tokenizer_src:
            for f in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_src, f)):
                    shutil.copy(os.path.join(tokenizer_src, f), os.path.join(out, f))
        with HFCheckpointWriter(out, manifest, max_shard_bytes=parse_size(ns.max_shard_size)) as w:
            for k, a in items:
                if k not in dts:
                    continue  # e.g. MTP tensors under --no_mtp
                a = np.asarray(a).astype(dts[k], copy=False)
                w.write(k, a)
                prog(a.nbytes)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for f in os.listdir(out):
                p = os.path.join(out, f)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        raise
    finally:
        prog.close()
    return out


def hf_manifest(cfg: ModelConfig, dtype, include_mtp: bool, mtp_shared: bool) -> list:
    return [(s.key, s.shape, np.float32 if s.kind == "router_bias" else dtype)
            for s in hf_tensor_specs(cfg, include_mtp=include_mtp, mtp_shared=mtp_shared)]


def write_mcore(out: str, cfg: ModelConfig, get: Callable, dtype, ns, include_mtp: bool) -> str:
    from jaxmoe.convert.mcore_dist import write_mcore_dist
    pv = ns.padded_vocab_size or padded_vocab_size(cfg.vocab_size, ns.make_vocab_size_divisible_by, ns.tp)
    if pv < cfg.vocab_size:
        raise ConfigError(f"--padded_vocab_size {pv} < vocab_size {cfg.vocab_size}")
    c = cfg if include_mtp else cfg.replace(num_nextn_predict_layers=0)
    prog = Progress(_cfg_total_bytes(c, np.dtype(dtype).itemsize), "mcore", ns.quiet)

    def counted(key):
        a = get(key)
        prog(a.size * np.dtype(dtype).itemsize)
        return a
    try:
        it = ns.save_iteration or (ns.iteration if ns.direction.startswith("hf-") else None) or 1
        return write_mcore_dist(out, c, counted, dtype=dtype, iteration=it, padded_vocab=pv, tp=ns.tp, pp=ns.pp, ep=ns.ep, include_mtp=include_mtp,
                                args_overrides={"make_vocab_size_divisible_by": ns.make_vocab_size_divisible_by})
    finally:
        prog.close()


def write_orbax_out(out: str, cfg: ModelConfig, get: Callable, dtype, ns, source: str,
                    tokenizer_src: str | None = None) -> str:
    from jaxmoe.convert.orbax_io import write_orbax
    from jaxmoe.hf import TOKENIZER_FILES
    prog = Progress(_cfg_total_bytes(cfg, np.dtype(dtype).itemsize), "orbax", ns.quiet)
    extra = [os.path.join(tokenizer_src, f) for f in TOKENIZER_FILES
             if tokenizer_src and os.path.isfile(os.path.join(tokenizer_src, f))]
    try:
        return write_orbax(out, cfg, get, dtype=dtype, progress=prog, meta_extra={"converted_from": source},
                           root_files=extra)
    finally:
        prog.close()


# ---- directions -------------------------------------------------------------------------------------
def run(ns) -> str:
    d, src, out = ns.direction, ns.input, ns.output
    dtype = parse_dtype(ns.dtype)
    parse_size(ns.max_shard_size)
    if src is None or out is None:
        raise ConfigError(f"{d}: --input and --output are required")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ConfigError(f"--output {out} is the same path as --input")
    check_output(out, "mcore" if d.endswith("to-mcore") else "dir")
    if d == "hf-reshard":
        from jaxmoe.hf import reshard_hf
        open_hf(src, ns)  # validate before writing
        final = reshard_hf(src, out, dtype=dtype, max_shard_bytes=parse_size(ns.max_shard_size))
        from jaxmoe.hf import TOKENIZER_FILES
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), os.path.join(final, f))
        return final
    if d.startswith("hf-"):
        r, cfg, mtp = open_hf(src, ns)
        if d == "hf-to-orbax":
            return write_orbax_out(out, cfg, r.get, dtype or np.float32, ns, src, tokenizer_src=src)
        return write_mcore(out, cfg, r.get, dtype or r.spec("model.embed_tokens.weight").dtype, ns, mtp)
    if d.startswith("mcore-"):
        r, cfg = open_mcore(src, ns)
        if ns.no_mtp:
            cfg = cfg.replace(num_nextn_predict_layers=0)
        from jaxmoe.convert.mcore_dist import McoreHFGetter
        get = McoreHFGetter(r, cfg)
        if d == "mcore-to-orbax":
            return write_orbax_out(out, cfg, get, dtype or np.float32, ns, src)
        from jaxmoe.convert.mcore_dist import _NP_OF_TORCH
        dt = dtype or np.dtype(_NP_OF_TORCH[r._tmeta("embedding.word_embeddings.weight").properties.dtype])
        mtp = cfg.num_nextn_predict_layers > 0
        manifest = hf_manifest(cfg, dt, mtp, mtp_shared=mtp)
        from jaxmoe.convert.hf_params import mtp_duplicate_keys
        copies = mtp_duplicate_keys(cfg) if mtp else {}
        return write_hf(out, cfg, manifest, with_mtp_copies(((k, get(k)) for k, _, _ in manifest if k not in copies),
                                                            copies), ns)
    if d.startswith("orbax-"):
        r = open_orbax(src, ns)
        cfg = r.cfg
        if ns.no_mtp and cfg.num_nextn_predict_layers:
            cfg = cfg.replace(num_nextn_predict_layers=0)
        dt = dtype or r.dtype()
        mtp = cfg.num_nextn_predict_layers > 0
        if d == "orbax-to-mcore":
            return write_mcore(out, cfg, r.get, dt, ns, mtp)
        from jaxmoe.convert.orbax_io import iter_orbax_hf
        tok = os.path.dirname(r.dir)  # hf-to-orbax keeps the tokenizer files next to the step dirs
        return write_hf(out, cfg, hf_manifest(cfg, dt, mtp, mtp_shared=mtp), iter_orbax_hf(r), ns, tok)
    if d == "legacy-to-hf":
        from jaxmoe.convert.mcore_legacy import McoreLegacyReader
        r = McoreLegacyReader(src, ns.iteration)
        cfg = _load_config_flag(ns) or config_from_megatron_args(r.args, f"{r.dir}/mp_rank_00*/model_optim_rng.pt")
        has_mtp = any(k.startswith("mtp.layers.") for k in r._model(0, r.pp - 1, 0))
        if not has_mtp:
            cfg = cfg.replace(num_nextn_predict_layers=0)
        emb = r._get("embedding.word_embeddings.weight", 0)
        from jaxmoe.convert.mcore_dist import _NP_OF_TORCH
        dt = dtype or np.dtype(_NP_OF_TORCH[emb.dtype])
        mtp = has_mtp and not ns.no_mtp
        out_cfg = cfg if mtp else cfg.replace(num_nextn_predict_layers=0)
        from jaxmoe.convert.hf_params import mtp_duplicate_keys
        return write_hf(out, out_cfg, hf_manifest(cfg, dt, mtp, mtp_shared=mtp),
                        with_mtp_copies(r.iter_hf(cfg), mtp_duplicate_keys(cfg) if mtp else {}), ns)
    raise ConfigError(f"unknown direction {d!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxmoe.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    helps = {"hf-to-orbax": "HF safetensors dir -> jaxmoe.train checkpoint (usable with --load DIR --finetune)",
             "orbax-to-hf": "jaxmoe.train checkpoint (params + router biases; optimizer state skipped) -> HF dir",
             "hf-to-mcore": "HF safetensors dir -> Megatron-Core torch_dist checkpoint",
             "mcore-to-hf": "Megatron-Core torch_dist checkpoint (e.g. `swift export --to_mcore`) -> HF dir",
             "mcore-to-orbax": "Megatron-Core torch_dist checkpoint -> jaxmoe.train checkpoint",
             "orbax-to-mcore": "jaxmoe.train checkpoint -> Megatron-Core torch_dist checkpoint",
             "legacy-to-hf": "Megatron legacy torch checkpoint (mp_rank_XX/model_optim_rng.pt) -> HF dir",
             "hf-reshard": "HF dir -> HF dir: re-shard (--max_shard_size), cast (--dtype), add MTP embed/head copies"}
    for d in DIRECTIONS:
        p = sub.add_parser(d, help=helps[d], description=helps[d])
        p.add_argument("--input", required=True, help="source checkpoint: HF dir, orbax root or step dir, Megatron "
                       "root (with latest_checkpointed_iteration.txt) or iter_XXXXXXX dir")
        p.add_argument("--output", required=True, help="destination; must not exist or be empty (a Megatron root "
                       "may hold other iterations)")
        p.add_argument("--dtype", default=None, help="output parameter dtype: float32 | bfloat16 | float16. Default: "
                       "the source's dtype (orbax outputs: float32, the training master dtype). Router biases stay fp32")
        p.add_argument("--iteration", type=int, default=None, help="Megatron / orbax sources: the iteration (step) "
                       "to read (default: the latest). hf-to-mcore: the iteration to write (default 1)")
        p.add_argument("--save_iteration", type=int, default=None, help="mcore outputs: the iteration directory "
                       "to write (default: --iteration for hf-to-mcore, else 1)")
        p.add_argument("--config", default=None, help="a HF config.json describing the model; overrides the "
                       "config from the source (config.json, orbax meta, Megatron args)")
        p.add_argument("--tp", type=int, default=1, help="mcore outputs: tensor-parallel size recorded in args "
                       "(torch_dist tensors do not depend on it) and used to pad the vocab")
        p.add_argument("--pp", type=int, default=1, help="mcore outputs: pipeline-parallel size recorded in args")
        p.add_argument("--ep", type=int, default=1, help="mcore outputs: expert-parallel size recorded in args")
        p.add_argument("--padded_vocab_size", type=int, default=None, help="mcore outputs: rows of the embedding / "
                       "output layer (default: vocab rounded up to make_vocab_size_divisible_by * tp)")
        p.add_argument("--make_vocab_size_divisible_by", type=int, default=128, help="mcore outputs: Megatron's "
                       "vocab padding multiple (default 128)")
        p.add_argument("--max_shard_size", default="5GB", help="HF outputs: largest safetensors shard, e.g. 5GB, "
                       "500MB, 2GiB (default 5GB)")
        p.add_argument("--no_mtp", action="store_true", help="drop the multi-token-prediction layers from the output")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    from jaxmoe.convert.verify import add_parser as add_verify
    add_verify(sub)
    from jaxmoe.lora.merge import add_merge_lora_args
    add_merge_lora_args(sub.add_parser("merge-lora", help="jaxmoe LoRA checkpoint + base -> merged HF / mcore dir, "
                                       "or the adapters alone in PEFT format"))
    return ap


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.direction == "verify":
            from jaxmoe.convert.verify import run as run_verify
            return run_verify(ns)
        if ns.direction == "merge-lora":
            from jaxmoe.lora.merge import merge_lora_cli
            merge_lora_cli(ns)
            return 0
        out = run(ns)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError / ConfigError / HFLayoutError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
