"""Tokenise jsonl into Megatron indexed datasets, like Megatron-LM's tools/preprocess_data.py.

    python -m jaxmoe.data.preprocess --input a.jsonl [b.jsonl ...] --json_keys text \\
        --tokenizer path/to/hf_tokenizer_dir --output_prefix out --append_eod --workers 2

writes out_text_document.bin/.idx (one per json key): one document and one sequence per line, the
tokens of the text (no special tokens unless --add_special_tokens; Megatron's HF tokenizer default)
plus the tokenizer's EOS when --append_eod and the text is not empty. An empty text becomes an
empty document. Token dtype is uint16 when len(tokenizer) < 65500, else int32 (Megatron's rule).
Lines are tokenised in chunks by a process pool, in input order.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from jaxmoe.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype


class PreprocessError(ValueError):
    """Bad input line, bad tokenizer or bad arguments."""


_TOKENIZER = None  # per process: (tokenizer, add_special_tokens, eod)


def _load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # transformers raises many types here; one clear message is what matters
        raise PreprocessError(f"--tokenizer {tokenizer_dir}: cannot load a Hugging Face tokenizer "
                              f"({type(e).__name__}: {e}); pass a directory holding "
                              f"tokenizer.json / tokenizer_config.json") from e


def _init_worker(tokenizer_dir: str, add_special_tokens: bool, eod: int | None, in_pool: bool):
    global _TOKENIZER
    if in_pool:  # one thread per worker process; the pool is the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = (_load_tokenizer(tokenizer_dir), add_special_tokens, eod)


def _encode(texts: list[str]) -> list[list[int]]:
    tok, special, _ = _TOKENIZER
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: same ids, no BatchEncoding overhead
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
    return tok(texts, add_special_tokens=special)["input_ids"]


def _encode_chunk(task):
    """(path, first line number, raw lines, keys) -> (path, per-key (tokens, doc lengths), bad, n)."""
    path, first, lines, keys = task
    eod = _TOKENIZER[2]
    texts = {k: [] for k in keys}
    bad = []
    for n, raw in enumerate(lines, start=first):
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            bad.append((n, f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        except json.JSONDecodeError as e:
            bad.append((n, f"invalid JSON ({e.msg} at column {e.colno})" if raw.strip() else "empty line"))
            continue
        if not isinstance(obj, dict):
            bad.append((n, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        missing = [k for k in keys if k not in obj]
        wrong = [k for k in keys if k in obj and not isinstance(obj[k], str)]
        if missing:
            bad.append((n, f"missing key {missing[0]!r} (keys present: {sorted(obj)[:8]})"))
        elif wrong:
            bad.append((n, f"key {wrong[0]!r} holds {type(obj[wrong[0]]).__name__}, expected a string"))
        else:
            for k in keys:
                texts[k].append(obj[k])
    out = {}
    for k in keys:
        ids = _encode(texts[k]) if texts[k] else []
        if eod is not None:
            ids = [d + [eod] if d else d for d in ids]
        lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        out[k] = (flat, lengths)
    return path, out, bad, sum(len(x) for x in lines)


def _chunks(inputs, keys, chunk_lines):
    for path in inputs:
        with open(path, "rb") as f:
            buf, first = [], 1
            for n, line in enumerate(f, start=1):
                buf.append(line)
                if len(buf) == chunk_lines:
                    yield path, first, buf, keys
                    buf, first = [], n + 1
            if buf:
                yield path, first, buf, keys


def _ordered_results(tasks, pool, workers):
    """Results in input order; at most a few chunks in flight so memory stays bounded."""
    if pool is None:
        for t in tasks:
            yield _encode_chunk(t)
        return
    pending = collections.deque()
    for t in tasks:
        pending.append(pool.apply_async(_encode_chunk, (t,)))
        if len(pending) >= 2 * workers + 2:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclass
class PreprocessResult:
    outputs: dict[str, str]  # json key -> output prefix (without .bin/.idx)
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    bad_lines: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def preprocess(inputs: list[str], json_keys: list[str], tokenizer: str, output_prefix: str, *,
               append_eod: bool = False, workers: int = 1, skip_bad_lines: bool = False,
               add_special_tokens: bool = False, chunk_lines: int = 512,
               progress: bool = True) -> PreprocessResult:
    for p in inputs:
        if not os.path.isfile(p):
            raise PreprocessError(f"--input {p}: no such file")
    if not json_keys:
        raise PreprocessError("--json_keys: give at least one key, e.g. text")
    tok = _load_tokenizer(tokenizer)
    eod = None
    if append_eod:
        eod = tok.eos_token_id
        if eod is None:
            raise PreprocessError(f"--append_eod: the tokenizer in {tokenizer} has no eos_token; "
                                  f"set eos_token in its tokenizer_config.json or drop --append_eod")
    dtype = optimal_dtype(len(tok))
    del tok
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {k: f"{output_prefix}_{k}_document" for k in json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for k, p in prefixes.items()}
    result = PreprocessResult(outputs=prefixes)
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    t0 = time.perf_counter()
    init_args = (tokenizer, add_special_tokens, eod)
    pool = None
    if workers > 1:  # forked before any thread (tqdm's monitor) exists
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else None)
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(*init_args, True))
    else:
        _init_worker(*init_args, False)
    results = _ordered_results(_chunks(inputs, list(json_keys), chunk_lines), pool, workers)
    try:
        from tqdm import tqdm

        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=not progress, file=sys.stderr) as bar:
            for path, per_key, bad, nbytes in results:
                for n, msg in bad:
                    where = f"{path}:{n}: {msg}"
                    if not skip_bad_lines:
                        raise PreprocessError(f"{where}; fix the line, or pass --skip_bad_lines "
                                              f"to skip and count such lines")
                    result.bad_lines.append(where)
                for k, (flat, lengths) in per_key.items():
                    builders[k].add_documents(flat, lengths)
                    result.tokens += int(flat.size)
                result.documents += int(next(iter(per_key.values()))[1].size)
                bar.update(nbytes)
                bar.set_postfix(docs=result.documents, tokens=result.tokens, refresh=False)
        if not result.documents:  # an empty dataset would only fail later, in training
            why = f"all {len(result.bad_lines)} lines were bad" if result.bad_lines else "the input is empty"
            raise PreprocessError(f"no documents in {', '.join(inputs)} ({why}); nothing written")
    except BaseException:
        for k, b in builders.items():  # no half-written dataset is left behind
            b._file.close()
            os.remove(prefixes[k] + ".bin")
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for k, b in builders.items():
        b.finalize(prefixes[k] + ".idx")
    result.seconds = time.perf_counter() - t0
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxmoe.data.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl file(s), one document per line")
    p.add_argument("--json_keys", "--json-keys", nargs="+", default=["text"],
                   help="keys to tokenise; each gets its own output dataset (default: text)")
    p.add_argument("--tokenizer", "--tokenizer-model", required=True,
                   help="Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json)")
    p.add_argument("--output_prefix", "--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--append_eod", "--append-eod", action="store_true",
                   help="append the tokenizer's EOS id to every non-empty document")
    p.add_argument("--add_special_tokens", action="store_true",
                   help="let the tokenizer add its special tokens (BOS/prefix) to each document")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument("--chunk_lines", type=int, default=512, help="lines per work unit")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.chunk_lines < 1:
        print("error: --workers and --chunk_lines must be >= 1", file=sys.stderr)
        return 2
    try:
        r = preprocess(args.input, args.json_keys, args.tokenizer, args.output_prefix,
                       append_eod=args.append_eod, workers=args.workers,
                       skip_bad_lines=args.skip_bad_lines, add_special_tokens=args.add_special_tokens,
                       chunk_lines=args.chunk_lines, progress=not args.no_progress)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if r.bad_lines:
        shown = "\n  ".join(r.bad_lines[:10])
        more = f"\n  ... and {len(r.bad_lines) - 10} more" if len(r.bad_lines) > 10 else ""
        print(f"skipped {len(r.bad_lines)} bad lines:\n  {shown}{more}", file=sys.stderr)
    for k, prefix in r.outputs.items():
        print(f"wrote {prefix}.bin and {prefix}.idx (key {k!r})")
    print(f"{r.documents} documents, {r.tokens} tokens in {r.seconds:.2f} s: "
          f"{r.tokens_per_second:,.0f} tokens/s with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
