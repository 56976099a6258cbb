"""Text generation with the KV cache: sampling, stop conditions, the GLM-4.5 chat prompt and the CLI.

    python -m jaxmoe.generate --model tiny --prompt "Hello" --max_new_tokens 32
    python -m jaxmoe.generate --model /path/to/GLM-4.5-Air --prompt "..." --temperature 0.7 --top_p 0.9

Library entry points: `generate(params, state, cfg, tokenizer, prompts, ...)` (text in, text out) and
`generate_ids(params, state, cfg, prompt_ids, ...)` (token ids in and out). Prefill and step are each
compiled once per (model, batch, padded prompt length, cache length, sampling settings); the token loop is
a Python loop over the jitted step (so text can stream) and never recompiles.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import decode
from jaxmoe.config import ConfigError, ModelConfig, load_model_config
from jaxmoe.model.options import ModelOptions

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off. HF order: temperature, top-k, top-p."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample_logits(logits, key, s: SamplingConfig):
    """logits [B, V] fp32 -> token ids [B] int32."""
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / s.temperature
    V = x.shape[-1]
    if 0 < s.top_k < V:
        kth = jax.lax.top_k(x, s.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1.0:
        xs = jnp.sort(x, axis=-1)[:, ::-1]
        p = jax.nn.softmax(xs, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # mass of strictly better tokens; the best always stays
        n_keep = jnp.sum(before < s.top_p, axis=-1, keepdims=True)
        cut = jnp.take_along_axis(xs, n_keep - 1, axis=-1)
        x = jnp.where(x < cut, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


class Decoder:
    """Jitted prefill and step (+ sampling) for one model config, options and sampling setting."""

    def __init__(self, cfg: ModelConfig, opts: ModelOptions, sampling: SamplingConfig):
        self.cfg, self.opts, self.sampling = cfg, opts, sampling

        def prefill(params, state, tokens, mask, key, max_len):
            logits, cache = decode.prefill(params, state, tokens, mask, max_len, cfg, opts)
            return sample_logits(logits, jax.random.fold_in(key, 0), sampling), logits, cache

        def step(params, state, cache, tokens, key, i):
            logits, cache = decode.step(params, state, cache, tokens, cfg, opts)
            # The i-th generated token (0 = from prefill) draws with fold_in(key, i): seed and step only.
            return sample_logits(logits, jax.random.fold_in(key, i), sampling), logits, cache

        self.prefill = jax.jit(prefill, static_argnums=(5,))
        self.step = jax.jit(step, donate_argnums=(2,))  # the cache is updated in place


_DECODERS: dict[Any, Decoder] = {}


def get_decoder(cfg: ModelConfig, opts: ModelOptions, sampling: SamplingConfig) -> Decoder:
    """A Decoder reused across calls with the same settings (ModelConfig may hold lists: key by repr)."""
    key = (repr(cfg), opts, sampling)
    if key not in _DECODERS:
        _DECODERS[key] = Decoder(cfg, opts, sampling)
    return _DECODERS[key]


def eos_ids_for(cfg: ModelConfig, tokenizer=None) -> list[int]:
    """Config eos_token_id (int or list) plus the GLM stop words the tokenizer has as single tokens."""
    ids = cfg.eos_token_id
    out = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer is not None:
        from jaxmoe.data.template import STOP_WORDS  # <|endoftext|>, <|user|>, <|observation|>

        unk = getattr(tokenizer, "unk_token_id", None)
        for w in STOP_WORDS:
            i = tokenizer.convert_tokens_to_ids(w)
            if isinstance(i, int) and i != unk:
                out.append(i)
        if tokenizer.eos_token_id is not None:
            out.append(tokenizer.eos_token_id)
    return sorted(set(out))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int, padding: str = "left", multiple: int = 16):
    """Lists of ids -> (tokens [B, T], mask [B, T]) int32 numpy, T rounded up to `multiple` so prompts of
    similar length share one prefill compile."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    T = _round_up(max(len(p) for p in prompt_ids), multiple)
    tokens = np.full((len(prompt_ids), T), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), T), np.int32)
    for i, p in enumerate(prompt_ids):
        cols = slice(T - len(p), T) if padding == "left" else slice(0, len(p))
        tokens[i, cols] = np.asarray(p, np.int32)
        mask[i, cols] = 1
    return tokens, mask


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # generated ids, without the stop token
    finish_reason: str  # "stop" (an EOS / stop id) or "length" (max_new_tokens)
    stop_id: int | None = None
    text: str | None = None
    logits: list[np.ndarray] | None = None  # per generated token [V] fp32, when return_logits


def generate_ids(params, state, cfg: ModelConfig, prompt_ids: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 eos_ids: Sequence[int] = (), pad_id: int | None = None, padding: str = "left",
                 opts: ModelOptions = ModelOptions(), on_step: Callable | None = None,
                 return_logits: bool = False) -> list[Generation]:
    """Decode a batch of prompts (lists of ids). Each row stops at its first id in `eos_ids` or after
    max_new_tokens; the batch stops when every row has. on_step(step, tokens [B], done [B]) is called with
    each step's new ids (numpy) for streaming; rows already done repeat their stop id."""
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("no prompts given")
    pad_id = (cfg.pad_token_id or 0) if pad_id is None else pad_id
    tokens, mask = pad_prompts(prompt_ids, pad_id, padding)
    B, T = tokens.shape
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest - max_new_tokens} tokens) + --max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings ({cfg.max_position_embeddings}); "
                         f"shorten the prompt or lower --max_new_tokens")
    max_len = _round_up(T + max_new_tokens, 16)
    dec = get_decoder(cfg, opts, sampling)
    key = jax.random.PRNGKey(seed)
    eos = np.asarray(sorted(set(int(i) for i in eos_ids)), np.int64)

    tok, logits, cache = dec.prefill(params, state, jnp.asarray(tokens), jnp.asarray(mask), key, max_len)
    out: list[list[int]] = [[] for _ in range(B)]
    all_logits: list[list[np.ndarray]] = [[] for _ in range(B)]
    stop_id: list[int | None] = [None] * B
    done = np.zeros(B, bool)
    for i in range(max_new_tokens):
        t = np.asarray(tok)
        lg = np.asarray(logits) if return_logits else None
        for b in range(B):
            if done[b]:
                continue
            if return_logits:
                all_logits[b].append(lg[b])
            if t[b] in eos:
                done[b], stop_id[b] = True, int(t[b])
            else:
                out[b].append(int(t[b]))
        shown = np.where(done, np.asarray([s if s is not None else pad_id for s in stop_id]), t)
        if on_step is not None:
            on_step(i, shown, done.copy())
        if done.all() or i == max_new_tokens - 1:
            break
        tok, logits, cache = dec.step(params, state, cache, jnp.asarray(shown, jnp.int32), key,
                                     jnp.asarray(i + 1, jnp.int32))
    return [Generation(out[b], "stop" if stop_id[b] is not None else "length", stop_id[b],
                       logits=all_logits[b] if return_logits else None) for b in range(B)]


def chat_prompt(user: str, system: str | None = None) -> str:
    """GLM-4.5 prompt for one user turn plus the generation prompt `<|assistant|>\\n`:
    `[gMASK]<sop>[<|system|>\\n{system}]<|user|>\\n{user}<|assistant|>\\n` (GLM-4.5's chat_template.jinja; the
    same pieces jaxmoe.data.template renders for training, without the assistant answer)."""
    from jaxmoe.data import template  # lazy: only the chat path needs it

    text = template.PREFIX
    if system:
        text += "<|system|>\n" + system
    return text + "<|user|>\n" + user + "<|assistant|>\n"


def generate(params, state, cfg: ModelConfig, tokenizer, prompts: str | Sequence[str], *,
             system: str | None = None, chat_template: bool = True, max_new_tokens: int = 128,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, opts: ModelOptions = ModelOptions(),
             stream: Callable[[str], None] | None = None) -> list[Generation]:
    """Text in, text out. Each prompt is wrapped in the GLM-4.5 chat template unless chat_template=False.
    stream(text_piece) receives the first prompt's decoded text as it is generated."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [chat_prompt(p, system) if chat_template else p for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} tokenizes to nothing; give some text or use the chat template")
        if max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token id {max(p)} >= the model's vocab_size {cfg.vocab_size}: "
                             f"the tokenizer does not match the model; pass the model's own --tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
    on_step = None
    if stream is not None:
        printed = {"ids": [], "text": ""}

        def on_step(step, toks, done):
            if done[0]:
                return
            printed["ids"].append(int(toks[0]))
            text = tokenizer.decode(printed["ids"], skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                return
            stream(text[len(printed["text"]):])
            printed["text"] = text

    gens = generate_ids(params, state, cfg, ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                        eos_ids=eos_ids_for(cfg, tokenizer), pad_id=pad, opts=opts, on_step=on_step)
    for g in gens:
        g.text = tokenizer.decode(g.token_ids, skip_special_tokens=False)
    if stream is not None:  # flush anything held back (e.g. a trailing replacement char)
        rest = gens[0].text[len(printed["text"]):]
        if rest:
            stream(rest)
    return gens


# ---- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jaxmoe.generate",
        description="Generate text from a GLM-4.5 MoE model with a KV cache (prefill + one token per step).")
    ap.add_argument("--model", required=True,
                    help="a HF model directory (config.json + safetensors, loaded with jaxmoe.load_pretrained) "
                         "or a preset name (tiny, glm4.5-air, glm4.5) for a randomly initialised model")
    ap.add_argument("--load", default=None,
                    help="a jaxmoe.train orbax checkpoint directory (<dir>/<step>/): weights, router biases and "
                         "config come from its latest step; --model then only picks the tokenizer")
    ap.add_argument("--prompt", action="append", required=True,
                    help="the user message; repeat the flag for a batch (only the first one streams)")
    ap.add_argument("--system", default=None, help="optional system message for the chat template")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="most tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    ap.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    ap.add_argument("--top_p", type=float, default=1.0,
                    help="nucleus sampling: smallest set of tokens with this much probability; 1 = off")
    ap.add_argument("--seed", type=int, default=0,
                    help="sampling seed (and the init seed of a preset's random weights)")
    ap.add_argument("--no_chat_template", action="store_true",
                    help="feed --prompt as raw text instead of wrapping it in the GLM-4.5 chat template")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer directory; default: the --model directory, or the bundled tiny tokenizer "
                         "for the tiny preset")
    ap.add_argument("--compute_dtype", default="auto",
                    help="matmul dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 or bfloat16")
    ap.add_argument("--kernels", default="reference",
                    help="prefill attention/norm kernels (ModelOptions.kernels): reference, auto or pallas")
    return ap


def load_checkpoint_weights(directory: str, dtype: str = "float32"):
    """(params, state, cfg) from a jaxmoe.train orbax checkpoint: restores only the weights and router
    biases ("params", "model_state") of the latest step; the config comes from the checkpoint's meta."""
    from jaxmoe.model.params import init_state, param_shapes
    from jaxmoe.train import checkpoint as ckpt_lib

    if not ckpt_lib.is_checkpoint_dir(directory):
        raise ConfigError(f"--load {directory}: not a jaxmoe training checkpoint (expected <dir>/<step>/ "
                          "written by `python -m jaxmoe.train --save`)")
    cfg = ckpt_lib.model_config_from_meta(ckpt_lib.read_meta(directory))
    state_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), init_state(cfg))
    want = {"params": param_shapes(cfg, jnp.float32), "model_state": state_shapes}
    got, _, _ = ckpt_lib.restore(directory, want, partial=True)
    params = jax.tree.map(lambda a: a.astype(dtype), got["params"])
    return params, got["model_state"], cfg


def load_model(model: str, load: str | None = None, dtype: str = "float32", seed: int = 0):
    """(params, state, cfg, kind) for the CLI's --model / --load; kind is 'checkpoint', 'hf' or 'random'."""
    from jaxmoe.model.params import init_params, init_state

    if load is not None:
        return (*load_checkpoint_weights(load, dtype), "checkpoint")
    if os.path.isdir(model):
        from jaxmoe.hf import load_pretrained

        m = load_pretrained(model, dtype=dtype)
        return m.params, m.state, m.config, "hf"
    cfg = load_model_config(model)
    return init_params(cfg, jax.random.PRNGKey(seed), jnp.dtype(dtype)), init_state(cfg), cfg, "random"


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        ap.error(str(e))
    if args.max_new_tokens < 1:
        ap.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    dtype = args.compute_dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16"):
        ap.error(f"--compute_dtype must be auto, float32 or bfloat16, got {args.compute_dtype!r}")
    opts = ModelOptions(compute_dtype=dtype, kernels=args.kernels)

    from jaxmoe.data.tokenizer import load_tokenizer

    if args.load is None and not os.path.isdir(args.model):
        try:  # a bad --model fails here, before the slow tokenizer/model loading
            load_model_config(args.model)
        except ConfigError as e:
            ap.error(str(e))
    tok_dir = args.tokenizer or (args.model if os.path.isdir(args.model) else None)
    if tok_dir is None and args.model != "tiny":
        ap.error(f"--model {args.model} is not a directory with a tokenizer (only the tiny preset has a bundled "
                 "one): pass --tokenizer DIR")
    try:
        tokenizer = load_tokenizer(tok_dir)
    except FileNotFoundError as e:
        ap.error(f"--tokenizer: {e}")
    try:
        params, state, cfg, kind = load_model(args.model, args.load, dtype, args.seed)
    except (ConfigError, FileNotFoundError) as e:
        ap.error(str(e))
    if kind == "random":
        print(f"[generate] --model {args.model}: preset with RANDOM weights (seed {args.seed}); the output is "
              "noise", file=sys.stderr)

    stream_first = len(args.prompt) == 1
    gens = generate(params, state, cfg, tokenizer, args.prompt, system=args.system,
                    chat_template=not args.no_chat_template, max_new_tokens=args.max_new_tokens,
                    sampling=sampling, seed=args.seed, opts=opts,
                    stream=(lambda s: print(s, end="", flush=True)) if stream_first else None)
    if stream_first:
        print()
    else:
        for i, g in enumerate(gens):
            print(f"=== [{i}] ({g.finish_reason}, {len(g.token_ids)} tokens)\n{g.text}")
    for i, g in enumerate(gens):
        print(f"[generate] prompt {i}: {len(g.token_ids)} tokens, finish_reason={g.finish_reason}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
