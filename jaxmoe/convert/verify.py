"""`python -m jaxmoe.convert verify --hf DIR --jaxmoe SRC`: do two checkpoints compute the same model?

Runs transformers' `Glm4MoeForCausalLM` (fp32, eager per-expert loop) on the HF dir and jaxmoe (fp32,
reference ops) on SRC (a HF dir, a jaxmoe.train orbax checkpoint or a Megatron torch_dist checkpoint),
on the same prompts: random token ids from a seed, or `--text` through the HF dir's tokenizer. Prints the
mean and max absolute logit difference, max diff / max |logit| and top-1 agreement; exits 1 when the
relative difference is above `--tol`, 2 on bad input.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from jaxmoe.config import ConfigError, ModelConfig


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="compare logits of transformers on --hf with jaxmoe on --jaxmoe",
                       description=__doc__)
    p.add_argument("--hf", required=True, help="HF checkpoint dir (config.json + safetensors): the reference")
    p.add_argument("--jaxmoe", required=True, help="what jaxmoe runs: a HF dir, a jaxmoe.train orbax checkpoint "
                   "(root or step dir) or a Megatron torch_dist checkpoint (root or iter dir)")
    p.add_argument("--prompts", type=int, default=2, help="number of random prompts (default 2)")
    p.add_argument("--seq_len", type=int, default=16, help="tokens per random prompt (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--text", action="append", default=None, help="a prompt text (repeatable), tokenized with "
                   "the --hf dir's tokenizer.json instead of random ids")
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed max|diff| / max|logit| (default 1e-5)")
    p.add_argument("--iteration", type=int, default=None, help="orbax / Megatron source: step to read")
    p.add_argument("--config", default=None, help="config.json for a Megatron source (default: the --hf one)")


def prompts(ns, vocab: int) -> list[np.ndarray]:
    if ns.text:
        tok_file = os.path.join(ns.hf, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ConfigError(f"--text needs {tok_file}; pass random prompts (--prompts N) instead")
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_file)
        out = [np.asarray(tok.encode(t).ids, np.int64) for t in ns.text]
        for t, ids in zip(ns.text, out):
            if not len(ids) or ids.max() >= vocab:
                raise ConfigError(f"--text {t!r}: tokenizes to {len(ids)} ids (max {ids.max() if len(ids) else '-'}"
                                  f"), outside the model's vocab of {vocab}")
        return out
    if ns.prompts <= 0 or ns.seq_len <= 0:
        raise ConfigError("--prompts and --seq_len must be positive")
    rng = np.random.default_rng(ns.seed)
    return [rng.integers(0, vocab, ns.seq_len) for _ in range(ns.prompts)]


def hf_logits(hf_dir: str, ids: list[np.ndarray]) -> list[np.ndarray]:
    import torch
    from transformers import Glm4MoeForCausalLM
    m = Glm4MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    m.config._experts_implementation = "eager"
    with torch.no_grad():
        return [m(torch.from_numpy(x)[None]).logits[0].float().numpy() for x in ids]


def jaxmoe_params(src: str, hf_cfg: ModelConfig, ns):
    """(params, state, cfg) of SRC in fp32, whichever format it is."""
    from jaxmoe.convert.hf_params import params_from_hf
    is_file = lambda f: os.path.isfile(os.path.join(src, f))  # noqa: E731
    if is_file("config.json") and not is_file("metadata.json") and not is_file("args.json"):  # args: a training run
        from jaxmoe.hf import load_pretrained
        m = load_pretrained(src, dtype="float32")
        return m.params, m.state, m.config
    is_mcore = (os.path.isfile(os.path.join(src, "latest_checkpointed_iteration.txt"))
                or os.path.isfile(os.path.join(src, "metadata.json")))
    if is_mcore:
        from jaxmoe.convert.mcore_dist import McoreDistReader, McoreHFGetter
        cfg = ModelConfig.from_json_file(ns.config) if ns.config else hf_cfg
        r = McoreDistReader(src, ns.iteration)
        r.plan(cfg)
        if not r.has_mtp():
            cfg = cfg.replace(num_nextn_predict_layers=0)
        params, state = params_from_hf(McoreHFGetter(r, cfg), cfg)
        return params, state, cfg
    from jaxmoe.convert.orbax_io import OrbaxCheckpointReader, read_params
    r = OrbaxCheckpointReader(src, ns.iteration)
    params, state = read_params(r)
    return params, state, r.cfg


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    d = np.concatenate([np.abs(a - b).reshape(-1) for a, b in zip(ref, got)])
    scale = max(float(np.abs(a).max()) for a in ref)
    top1 = np.concatenate([(a.argmax(-1) == b.argmax(-1)) for a, b in zip(ref, got)])
    return {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()), "max_abs_logit": scale,
            "rel_max_diff": float(d.max()) / max(scale, 1e-30), "top1_agreement": float(top1.mean()),
            "tokens": int(top1.size)}


def run(ns) -> int:
    from jaxmoe.hf import Model
    for flag, p in (("--hf", ns.hf), ("--jaxmoe", ns.jaxmoe)):
        if not os.path.isdir(p):
            raise ConfigError(f"{flag} {p}: not a directory")
    hf_cfg = ModelConfig.from_json_file(os.path.join(ns.hf, "config.json"))
    params, state, cfg = jaxmoe_params(ns.jaxmoe, hf_cfg, ns)
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "first_k_dense_replace"):
        if getattr(cfg, k) != getattr(hf_cfg, k):
            raise ConfigError(f"--jaxmoe {ns.jaxmoe}: {k}={getattr(cfg, k)} but --hf config.json has "
                              f"{getattr(hf_cfg, k)}; these are different models")
    ids = prompts(ns, cfg.vocab_size)
    model = Model(cfg, params, state)
    got = [np.asarray(model(x[None]))[0] for x in ids]
    ref = hf_logits(ns.hf, ids)
    r = compare(ref, got)
    print(f"verify: {len(ids)} prompt(s), {r['tokens']} tokens\n"
          f"  mean |diff| {r['mean_abs_diff']:.3e}   max |diff| {r['max_abs_diff']:.3e}   max |logit| "
          f"{r['max_abs_logit']:.3e}\n  max diff / max |logit| {r['rel_max_diff']:.3e} (tol {ns.tol:.1e})   "
          f"top-1 agreement {r['top1_agreement']:.2%}")
    if not r["rel_max_diff"] <= ns.tol:
        print(f"verify FAILED: max diff / max |logit| = {r['rel_max_diff']:.3e} > --tol {ns.tol:.1e}; "
              f"{ns.jaxmoe} does not compute the model in {ns.hf}", file=sys.stderr)
        return 1
    print("verify OK")
    return 0
