"""Training logs on process 0: Megatron-format text lines, metrics.jsonl, TensorBoard scalars, progress bar.

The loop calls `TrainLogger.log_train` after EVERY step (metrics.jsonl and TensorBoard get one record per
step, as Megatron's tensorboard_log_interval=1 does) and the text line is printed when
`iteration % log_interval == 0`. Like Megatron's `training_log`, the text line shows losses averaged over
the steps of the interval that were not skipped, and the skipped / NaN iteration counts of the interval
(the loop passes running totals; we difference them). Rates (elapsed ms, tokens/s) are printed as passed.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from typing import Any, TextIO

import numpy as np

REQUIRED_KEYS = ("consumed_samples", "elapsed_ms", "lr", "global_batch_size", "lm_loss", "grad_norm",
                 "skipped_iters", "nan_iters", "tokens", "tokens_per_sec", "num_devices")
# Averaged over the interval's non-skipped steps on the text line: metric key -> (text label, tb tag).
LOSS_KEYS = {"lm_loss": ("lm loss", "lm loss"), "mtp_loss": ("mtp loss", "mtp_1 loss"),
             "aux_loss": ("load balancing loss", "load_balancing_loss")}
# Other known scalars -> TensorBoard tag (Megatron's names where Megatron has one).
TB_TAGS = {"lr": "learning-rate", "global_batch_size": "batch-size", "loss_scale": "loss-scale",
           "grad_norm": "grad-norm", "tokens": "loss-tokens", "tokens_per_sec": "tokens-per-second",
           "skipped_iters": "skipped-iterations", "nan_iters": "nan-iterations", "num_devices": "world-size"}
# Token-copy counts of the expert-parallel dispatch (moe/ep.py), summed over the interval on the text line.
COUNT_KEYS = {"moe_dropped": "dropped token copies", "moe_overflow": "EP buffer overflow copies (steps re-run)"}
METRICS_FILE = "metrics.jsonl"
TB_FLUSH_SECS = 10  # tensorboardX writes from a background thread: events reach the file within this time
_TB_WRITERS = itertools.count()


def tensorboard_writer(logdir: str):
    """A tensorboardX FileWriter on `logdir`. The pid + counter suffix keeps a second writer started in the
    same second (a quick restart) from truncating the first one's events.out.tfevents.<time>.<host> file."""
    from tensorboardX import FileWriter
    return FileWriter(logdir, flush_secs=TB_FLUSH_SECS, filename_suffix=f".{os.getpid()}.{next(_TB_WRITERS)}")


def expert_load_ratios(load) -> tuple[float, float] | None:
    """(max/mean, min/mean) of per-expert token counts, averaged over layers; None if no layer got tokens.

    `load` is [E] or per-layer [L, E]. A layer whose experts received no token has no defined ratio and is
    left out of the average.
    """
    a = np.asarray(load, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[-1] == 0:
        raise ValueError(f"metrics['expert_load'] has shape {np.shape(load)}; expected per-expert token "
                         "counts [E] or per-layer [L, E]")
    mean = a.mean(axis=-1)
    ok = mean > 0
    if not ok.any():
        return None
    return (float(np.mean(a.max(axis=-1)[ok] / mean[ok])), float(np.mean(a.min(axis=-1)[ok] / mean[ok])))


def megatron_train_line(iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                        lr: float, global_batch_size: int, losses: dict[str, float], loss_scale: float,
                        grad_norm: float | None, skipped: int, nan: int) -> str:
    """The line Megatron-LM's training_log prints (field order, widths and precisions as there)."""
    s = f" iteration {iteration:8d}/{train_iters:8d} |"
    s += f" consumed samples: {consumed_samples:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" learning rate: {lr:.3E} |"
    s += f" global batch size: {global_batch_size:5d} |"
    for name, value in losses.items():
        s += f" {name}: {value:.6E} |"
    s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan:3d} |"
    return s


def megatron_validation_lines(iteration: int, lm_loss: float) -> list[str]:
    """Megatron's evaluate_and_print_results block: dashes, the line (ending in '| '), dashes."""
    ppl = math.exp(min(20.0, lm_loss))
    s = f" validation loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | lm loss PPL: {ppl:.6E} | "
    dashes = "-" * (len(s) + 1)
    return [dashes, s, dashes]


def _numeric_kind(a: np.ndarray) -> str | None:
    """'f' for floats (ml_dtypes' bfloat16/float8 report kind 'V'), 'i' for ints/bools, else None."""
    if a.dtype.kind == "f" or a.dtype.name.startswith(("bfloat16", "float8", "float6", "float4")):
        return "f"
    return "i" if a.dtype.kind in "iub" else None


def _jsonable(key: str, value: Any) -> Any:
    """Full-precision JSON value: floats go through float() so json writes their round-trip repr."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    try:
        a = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - report which metric, whatever the array library raised
        raise TypeError(f"metrics[{key!r}]: cannot log a value of type {type(value).__name__} ({e})") from e
    kind = _numeric_kind(a)
    if kind == "f":
        return float(a) if a.ndim == 0 else a.astype(np.float64).tolist()
    if kind == "i":
        return a.item() if a.ndim == 0 else a.tolist()
    raise TypeError(f"metrics[{key!r}]: expected a number or numeric array, got {type(value).__name__} "
                    f"with dtype {a.dtype}")


def _scalar(key: str, value: Any) -> float:
    a = np.asarray(value)
    if a.ndim != 0 or _numeric_kind(a) is None:
        raise ValueError(f"metrics[{key!r}] must be a scalar number, got shape {a.shape} dtype {a.dtype}")
    return float(a)


def version_aside(path: str) -> str | None:
    """Rename an existing file to the first free `name.N.ext` (never overwrite a run's record); -> new path."""
    if not os.path.exists(path):
        return None
    base, ext = os.path.splitext(path)
    k = 1
    while os.path.exists(f"{base}.{k}{ext}"):
        k += 1
    os.replace(path, f"{base}.{k}{ext}")
    return f"{base}.{k}{ext}"


def _truncate_jsonl(path: str, start_iteration: int) -> tuple[int, dict | None, str | None]:
    """Keep records with iteration <= start_iteration (a crashed run may have logged past its checkpoint).

    Returns (number of dropped records, last kept train record at exactly start_iteration or None, the path the
    full file was kept under when records were dropped).
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept, dropped, last_train = [], 0, None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # half-written last line of a killed run: nothing to keep
                dropped += 1
                continue
            raise ValueError(f"{path}:{i}: not valid JSON ({e}); repair or delete that line to resume") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
            raise ValueError(f"{path}:{i}: expected a JSON object with an integer 'iteration'; repair or "
                             "delete that line to resume")
        if rec["iteration"] > start_iteration:
            dropped += 1
            continue
        kept.append(line)
        if rec["iteration"] == start_iteration and rec.get("split", "train") == "train":
            last_train = rec
    aside = version_aside(path) if dropped else None  # the full file stays as metrics.N.jsonl
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # atomic: a crash here leaves the old or the new file, never half of one
    return dropped, last_train, aside


class TrainLogger:
    """Drives all training output; create and call it on process 0 only."""

    def __init__(self, save_dir: str | None, train_iters: int, log_interval: int = 1,
                 tensorboard_dir: str | None = None, progress: bool | None = None, stream: TextIO | None = None,
                 start_iteration: int = 0):
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        if not 0 <= start_iteration <= train_iters:
            raise ValueError(f"start_iteration {start_iteration} outside [0, train_iters={train_iters}]")
        stream = sys.stdout if stream is None else stream  # looked up per call: sys.stdout may be swapped
        self.train_iters, self.log_interval, self.stream = train_iters, log_interval, stream
        self._last_iteration = start_iteration
        self._last_samples: int | None = None
        # Running totals at the previous step, to tell which steps were skipped / NaN.
        self._prev_totals: tuple[int, int] | None = (0, 0) if start_iteration == 0 else None
        self._reset_interval()

        self._jsonl, dropped, kept = None, 0, None
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, METRICS_FILE)
            if start_iteration > 0 and os.path.exists(path):
                dropped, last, aside = _truncate_jsonl(path, start_iteration)
                if last is not None and "skipped_iters" in last and "nan_iters" in last:
                    self._prev_totals = (int(last["skipped_iters"]), int(last["nan_iters"]))
                mode = "a"
            else:
                mode = "w"  # a run from iteration 0 starts its own file; an earlier run's is kept aside
                kept = version_aside(path)
            self._jsonl = open(path, mode, encoding="utf-8")
        self._tb = tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None

        if progress is None:
            isatty = getattr(stream, "isatty", None)
            progress = bool(isatty and isatty())
        self._bar = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=train_iters, initial=start_iteration, file=stream, unit="it",
                             dynamic_ncols=True, desc="train")
        if dropped:
            self.info(f"{os.path.join(save_dir, METRICS_FILE)}: dropped {dropped} record(s) past iteration "
                      f"{start_iteration} left by an earlier run (the full file is kept as "
                      f"{os.path.basename(aside)})")
        if kept:
            self.info(f"> kept the earlier {METRICS_FILE} as {os.path.basename(kept)}")

    # -- output primitives -------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            self.stream.write(msg + "\n")
            self.stream.flush()

    def _record(self, rec: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()

    def _reset_interval(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._skipped = self._nan = 0
        self._load_sum = None
        self._copies: dict[str, int] = {}

    # -- training steps ----------------------------------------------------------------------------
    def log_train(self, iteration: int, metrics: dict) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in metrics]
        if missing:
            raise KeyError(f"TrainLogger.log_train(iteration={iteration}): metrics lack {missing}; "
                           f"the loop must pass all of {list(REQUIRED_KEYS)}")
        if "iteration" in metrics or "split" in metrics:
            raise KeyError(f"TrainLogger.log_train(iteration={iteration}): 'iteration' and 'split' are "
                           "metrics.jsonl record fields; pass the iteration as the argument only")
        if iteration <= self._last_iteration:
            raise ValueError(f"TrainLogger.log_train: iteration {iteration} does not follow the last logged "
                             f"iteration {self._last_iteration}")
        if metrics["lm_loss"] is None:
            raise ValueError(f"TrainLogger.log_train(iteration={iteration}): metrics['lm_loss'] is None; "
                             "pass the step's loss as a number")
        self._last_iteration = iteration
        m = metrics
        skipped_total, nan_total = int(m["skipped_iters"]), int(m["nan_iters"])
        prev = self._prev_totals if self._prev_totals is not None else (skipped_total, nan_total)
        d_skipped, d_nan = skipped_total - prev[0], nan_total - prev[1]
        if d_skipped < 0 or d_nan < 0:
            raise ValueError(f"TrainLogger.log_train(iteration={iteration}): skipped_iters/nan_iters are "
                             f"running totals and went down from {prev} to {(skipped_total, nan_total)}")
        self._prev_totals = (skipped_total, nan_total)
        self._skipped += d_skipped
        self._nan += d_nan

        scalars = {k: _scalar(k, m[k]) for k in LOSS_KEYS if m.get(k) is not None}
        if d_skipped == 0:  # Megatron averages losses over the steps that updated the model
            for k, v in scalars.items():
                self._sums[k] = self._sums.get(k, 0.0) + v
                self._counts[k] = self._counts.get(k, 0) + 1
        for k in COUNT_KEYS:
            if m.get(k) is not None:
                self._copies[k] = self._copies.get(k, 0) + int(m[k])
        ratios = None
        if m.get("expert_load") is not None:
            load = np.asarray(m["expert_load"], dtype=np.float64)
            ratios = expert_load_ratios(load)
            if self._load_sum is not None and self._load_sum.shape != load.shape:
                raise ValueError(f"metrics['expert_load'] changed shape from {self._load_sum.shape} to "
                                 f"{load.shape} at iteration {iteration}")
            self._load_sum = load if self._load_sum is None else self._load_sum + load

        self._record({"iteration": iteration, "split": "train",
                      **{k: _jsonable(k, v) for k, v in m.items()}})
        if self._tb is not None:
            self._write_tb(iteration, m, scalars, ratios)
        self._last_samples = int(m["consumed_samples"])

        if self._bar is not None:
            self._bar.update(iteration - self._bar.n)
            tps = _scalar("tokens_per_sec", m["tokens_per_sec"])
            self._bar.set_postfix_str(f"loss={scalars['lm_loss']:.4f} tok/s={tps:.0f}", refresh=False)
        if iteration % self.log_interval == 0:
            self.info(self._interval_line(iteration, m))
            self._reset_interval()

    def _interval_line(self, iteration: int, m: dict) -> str:
        avg = {k: self._sums[k] / self._counts[k] for k in self._sums}
        losses = {"lm loss": avg["lm_loss"]} if "lm_loss" in avg else {}  # absent if every step was skipped
        grad_norm = m["grad_norm"]
        line = megatron_train_line(
            iteration, self.train_iters, int(m["consumed_samples"]), _scalar("elapsed_ms", m["elapsed_ms"]),
            _scalar("lr", m["lr"]), int(m["global_batch_size"]), losses,
            _scalar("loss_scale", m.get("loss_scale", 1.0)),
            None if grad_norm is None else _scalar("grad_norm", grad_norm), self._skipped, self._nan)
        for key in ("mtp_loss", "aux_loss"):
            if key in avg:
                line += f" {LOSS_KEYS[key][0]}: {avg[key]:.6E} |"
        tps = _scalar("tokens_per_sec", m["tokens_per_sec"])
        line += f" tokens per second: {tps:.1f} |"
        line += f" tokens per second per device: {tps / int(m['num_devices']):.1f} |"
        if self._load_sum is not None:
            ratios = expert_load_ratios(self._load_sum)
            if ratios is not None:
                line += f" expert load max/mean: {ratios[0]:.2f} | expert load min/mean: {ratios[1]:.2f} |"
        for key, label in COUNT_KEYS.items():
            if key in self._copies:
                line += f" {label}: {self._copies[key]} |"
        return line

    def _write_tb(self, iteration: int, m: dict, losses: dict[str, float], ratios) -> None:
        tb = {LOSS_KEYS[k][1]: v for k, v in losses.items()}
        for key, value in m.items():
            if key in LOSS_KEYS or key in ("consumed_samples", "elapsed_ms", "expert_load") or value is None:
                continue
            a = np.asarray(value)
            if a.ndim == 0 and _numeric_kind(a) is not None:  # arrays other than expert_load go to jsonl only
                tb[TB_TAGS.get(key, key)] = float(a)
        tb.setdefault("loss-scale", 1.0)
        tb["iteration-time"] = _scalar("elapsed_ms", m["elapsed_ms"]) / 1000.0  # seconds, as Megatron
        tb["tokens-per-second-per-device"] = tb["tokens-per-second"] / tb["world-size"]
        if ratios is not None:
            tb["expert-load-max/mean"], tb["expert-load-min/mean"] = ratios
        self._tb_scalars(iteration, tb)
        vs = {f"{tag} vs samples": tb[tag] for tag in ("lm loss", "learning-rate", "batch-size", "loss-scale")
              if tag in tb}
        self._tb_scalars(int(m["consumed_samples"]), vs)

    def _tb_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event with every scalar of the step. A Summary proto rather than SummaryWriter.add_scalar: that
        rewrites Megatron's tags ("lm loss" -> "lm_loss") and writes one event per tag."""
        from tensorboardX.proto.summary_pb2 import Summary
        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        self._tb.add_summary(Summary(value=values), int(step), time.time())

    # -- validation --------------------------------------------------------------------------------
    def log_validation(self, iteration: int, lm_loss: float, extra: dict | None = None) -> None:
        lm_loss = _scalar("lm_loss", lm_loss)
        lines = megatron_validation_lines(iteration, lm_loss)
        self.info("\n".join(lines))  # one write, so a progress bar is not redrawn between the lines
        ppl = math.exp(min(20.0, lm_loss))
        extra = extra or {}
        self._record({"iteration": iteration, "split": "valid", "lm_loss": lm_loss, "lm_loss_ppl": ppl,
                      **{k: _jsonable(k, v) for k, v in extra.items()}})
        if self._tb is not None:
            tb = {"lm loss validation": lm_loss, "lm loss validation ppl": ppl}
            for key, value in extra.items():
                a = np.asarray(value)
                if a.ndim == 0 and _numeric_kind(a) is not None:
                    tb[f"{key} validation"] = float(a)
            self._tb_scalars(iteration, tb)
            if self._last_samples is not None:
                self._tb_scalars(self._last_samples, {"lm loss validation vs samples": lm_loss})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
