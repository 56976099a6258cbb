"""TrainLogger: Megatron text lines, metrics.jsonl, TensorBoard event files, progress bar.

The TensorBoard files are decoded by an independent reader written here (bitwise CRC-32C, generic protobuf
wire parser), not by the writer's own helpers.
"""
import glob
import io
import json
import math
import os
import socket

import ml_dtypes
import numpy as np
import pytest

from jaxmoe.train.logging import TrainLogger, expert_load_ratios

# A log line of the Megatron-SWIFT seed run as Megatron prints it, one string.
SEED_LINE = (" iteration      100/    5000 | consumed samples:          800 | elapsed time per iteration (ms): 296.8 |"
             " learning rate: 3.937E-06 | global batch size:     8 | lm loss: 9.729805E+00 | loss scale: 131072.0 |"
             " grad norm: 5.703 | number of skipped iterations:  16 | number of nan iterations:   0 |")
SEED_VALID = " validation loss at iteration 1000 | lm loss value: 6.439325E+00 | lm loss PPL: 6.259840E+02 | "


def metrics(**over):
    m = dict(consumed_samples=8, elapsed_ms=296.8, lr=3.937e-6, global_batch_size=8, lm_loss=9.729805,
             grad_norm=5.703, skipped_iters=0, nan_iters=0, tokens=1000, tokens_per_sec=12345.67,
             num_devices=8)
    m.update(over)
    return m


def fields(line):
    return [f.strip() for f in line.split("|")]


# --------------------------------------------------------------------------------------------- text lines

def test_seed_line_over_an_interval_with_skipped_steps():
    """100 steps, the first 16 skipped (fp16 warm-up): losses of skipped steps must not enter the average."""
    out = io.StringIO()
    log = TrainLogger(None, train_iters=5000, log_interval=100, stream=out)
    for it in range(1, 101):
        skipped = min(it, 16)
        loss = 50.0 if it <= 16 else 9.729805 + (1e-7 if it % 2 else -1e-7)
        log.log_train(it, metrics(consumed_samples=8 * it, lm_loss=loss, loss_scale=131072.0,
                                  skipped_iters=skipped, tokens_per_sec=2000.0, num_devices=8))
    log.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(SEED_LINE)
    assert fields(line)[:len(fields(SEED_LINE)) - 1] == fields(SEED_LINE)[:-1]
    assert line[len(SEED_LINE):] == " tokens per second: 2000.0 | tokens per second per device: 250.0 |"


def test_line_defaults_extras_and_interval_reset():
    out = io.StringIO()
    log = TrainLogger(None, train_iters=5000, log_interval=2, stream=out)
    load_a = np.array([[10, 20, 30, 40], [25, 25, 25, 25]])
    load_b = np.array([[40, 30, 20, 10], [25, 25, 25, 25]])
    log.log_train(1, metrics(lm_loss=2.0, mtp_loss=3.0, aux_loss=0.25, expert_load=load_a, nan_iters=1,
                             skipped_iters=1))  # skipped: excluded from the loss averages, counted
    log.log_train(2, metrics(consumed_samples=16, lm_loss=4.0, mtp_loss=5.0, aux_loss=0.5, expert_load=load_b,
                             nan_iters=1, skipped_iters=1, tokens_per_sec=1000.0, num_devices=3))
    log.log_train(3, metrics(lm_loss=1.0, skipped_iters=1, nan_iters=1))
    log.log_train(4, metrics(consumed_samples=32, lm_loss=3.0, skipped_iters=1, nan_iters=1, grad_norm=None))
    log.close()
    l2, l4 = out.getvalue().splitlines()
    # Summed load over the interval is flat in both layers -> max/mean = min/mean = 1.
    assert l2 == (" iteration        2/    5000 | consumed samples:           16 | elapsed time per iteration (ms):"
                  " 296.8 | learning rate: 3.937E-06 | global batch size:     8 | lm loss: 4.000000E+00 |"
                  " loss scale: 1.0 | grad norm: 5.703 | number of skipped iterations:   1 |"
                  " number of nan iterations:   1 | mtp loss: 5.000000E+00 | load balancing loss: 5.000000E-01 |"
                  " tokens per second: 1000.0 | tokens per second per device: 333.3 |"
                  " expert load max/mean: 1.00 | expert load min/mean: 1.00 |")
    # New interval: counts reset, loss averaged over both steps, grad norm omitted when None (as Megatron).
    assert l4 == (" iteration        4/    5000 | consumed samples:           32 | elapsed time per iteration (ms):"
                  " 296.8 | learning rate: 3.937E-06 | global batch size:     8 | lm loss: 2.000000E+00 |"
                  " loss scale: 1.0 | number of skipped iterations:   0 | number of nan iterations:   0 |"
                  " tokens per second: 12345.7 | tokens per second per device: 1543.2 |")


def test_validation_lines_exact():
    out = io.StringIO()
    log = TrainLogger(None, train_iters=5000, stream=out)
    log.log_validation(1000, math.log(625.9840))
    log.log_validation(1001, 25.0)  # PPL clamps the exponent at 20, as Megatron
    log.close()
    lines = out.getvalue().split("\n")
    dashes = "-" * (len(SEED_VALID) + 1)
    assert lines[:3] == [dashes, SEED_VALID, dashes]
    assert lines[4] == " validation loss at iteration 1001 | lm loss value: 2.500000E+01 | lm loss PPL: 4.851652E+08 | "


def test_expert_load_ratios():
    load = np.array([[1.0, 2.0, 3.0, 6.0], [0, 0, 0, 0], [4.0, 4.0, 4.0, 4.0]])
    mx, mn = expert_load_ratios(load)  # empty layer 1 has no ratio and is left out
    assert mx == pytest.approx((6 / 3 + 1) / 2, rel=1e-15)
    assert mn == pytest.approx((1 / 3 + 1) / 2, rel=1e-15)
    assert expert_load_ratios([0, 0]) is None
    with pytest.raises(ValueError, match="expert_load"):
        expert_load_ratios(np.zeros((2, 2, 2)))


def test_bad_input_errors():
    log = TrainLogger(None, train_iters=10, stream=io.StringIO())
    bad = metrics()
    del bad["tokens_per_sec"]
    with pytest.raises(KeyError, match="tokens_per_sec"):
        log.log_train(1, bad)
    with pytest.raises(KeyError, match="'split'"):
        log.log_train(1, metrics(split="x"))
    log.log_train(1, metrics())
    with pytest.raises(ValueError, match="iteration 1 does not follow"):
        log.log_train(1, metrics())
    with pytest.raises(ValueError, match="running totals"):
        log.log_train(2, metrics(skipped_iters=-1))
    with pytest.raises(ValueError, match="'lm_loss'"):
        log.log_train(3, metrics(lm_loss=np.ones(2)))
    log.close()


# --------------------------------------------------------------------------------------------- metrics.jsonl

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_full_precision(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.standard_normal(4) * 10.0 ** rng.integers(-30, 30, 4)
    f32 = np.float32(1 / 3)
    load = rng.integers(0, 1000, (3, 8))
    bf16 = np.asarray(1.0078125, dtype=ml_dtypes.bfloat16)
    log = TrainLogger(str(tmp_path), train_iters=10, stream=io.StringIO())
    log.log_train(1, metrics(lm_loss=vals[0], lr=np.float64(vals[1]), grad_norm=np.asarray(vals[2]),
                             aux_loss=f32, expert_load=load, router_z=float(vals[3]),
                             per_layer=np.array([0.1, 0.2], np.float32), bf16_metric=bf16))
    log.log_validation(1, vals[3], extra={"mtp_loss": f32})
    log.close()
    train, valid = read_jsonl(tmp_path / "metrics.jsonl")
    assert train["iteration"] == 1 and train["split"] == "train"
    assert train["lm_loss"] == vals[0] and train["lr"] == vals[1] and train["grad_norm"] == vals[2]
    assert train["router_z"] == vals[3]
    assert train["aux_loss"] == float(f32)  # float32 widened exactly, not rounded to 6 digits
    assert train["expert_load"] == load.tolist()
    assert train["per_layer"] == [float(np.float32(0.1)), float(np.float32(0.2))]
    assert train["bf16_metric"] == 1.0078125  # bfloat16 (numpy kind 'V') is a float too
    assert train["consumed_samples"] == 8 and isinstance(train["consumed_samples"], int)
    assert valid == {"iteration": 1, "split": "valid", "lm_loss": vals[3],
                     "lm_loss_ppl": math.exp(min(20, vals[3])), "mtp_loss": float(f32)}


def test_jsonl_resume_drops_records_past_checkpoint(tmp_path):
    out = io.StringIO()
    log = TrainLogger(str(tmp_path), train_iters=10, log_interval=1, stream=out)
    for it in range(1, 9):  # run 1 crashes after iteration 8; last checkpoint at 6
        log.log_train(it, metrics(lm_loss=float(it), skipped_iters=int(it >= 3), nan_iters=int(it >= 5)))
        if it in (5, 7):
            log.log_validation(it, 0.5 * it)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 9, "lm_lo')  # killed mid-write

    out = io.StringIO()
    log = TrainLogger(str(tmp_path), train_iters=10, log_interval=1, stream=out, start_iteration=6)
    for it in range(7, 11):
        log.log_train(it, metrics(lm_loss=100.0 + it, skipped_iters=1, nan_iters=1))
    log.close()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r["iteration"] for r in recs if r["split"] == "train"]
    assert train == list(range(1, 11))
    assert [r["iteration"] for r in recs if r["split"] == "valid"] == [5]
    assert [r["lm_loss"] for r in recs if r["split"] == "train"][6:] == [107.0, 108.0, 109.0, 110.0]
    text = out.getvalue().splitlines()
    assert "dropped 4 record(s) past iteration 6" in text[0]
    # Totals at iteration 6 come from the kept record: the resumed steps are not counted as skipped.
    assert "number of skipped iterations:   0 | number of nan iterations:   0 |" in text[1]


def test_jsonl_corrupt_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        TrainLogger(str(tmp_path), train_iters=10, stream=io.StringIO(), start_iteration=1)


def test_fresh_run_replaces_old_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 5}\n')
    log = TrainLogger(str(tmp_path), train_iters=10, stream=io.StringIO())
    log.log_train(1, metrics())
    log.close()
    assert [r["iteration"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


# --------------------------------------------------------------------------------------------- TensorBoard

def run_with_tb(tb_dir):
    log = TrainLogger(None, train_iters=300, log_interval=10, tensorboard_dir=str(tb_dir), stream=io.StringIO())
    for it in (1, 2):
        log.log_train(it, metrics(consumed_samples=8 * it, lm_loss=1.0 / it, lr=1e-4 * it, mtp_loss=2.0 / it,
                                  aux_loss=0.01, expert_load=[[1, 3], [2, 2]], router_z=0.125,
                                  per_layer=[1.0, 2.0]))
    log.log_validation(200, 6.5, extra={"mtp loss": 7.0})
    log.close()


def test_tensorboard_scalars_read_back_by_tensorboard(tmp_path):
    """Read with TensorBoard's own EventAccumulator: every Megatron tag at its step, values as float32."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_with_tb(tmp_path)
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert len(files) == 1 and f".{socket.gethostname()}." in os.path.basename(files[0])
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert all(e.wall_time > 1.6e9 for tag in got for e in acc.Scalars(tag))
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    first = {"lm loss": 1.0, "mtp_1 loss": 2.0, "load_balancing_loss": f32(0.01), "learning-rate": f32(1e-4),
             "batch-size": 8.0, "grad-norm": f32(5.703), "skipped-iterations": 0.0, "nan-iterations": 0.0,
             "loss-tokens": 1000.0, "tokens-per-second": f32(12345.67), "world-size": 8.0,
             "router_z": 0.125, "loss-scale": 1.0, "iteration-time": f32(0.2968),
             "tokens-per-second-per-device": f32(12345.67 / 8), "expert-load-max/mean": f32(1.25),
             "expert-load-min/mean": f32(0.75)}
    assert {tag: v[0] for tag, v in got.items() if tag in first} == {tag: (1, v) for tag, v in first.items()}
    assert got["lm loss"] == [(1, 1.0), (2, 0.5)] and got["learning-rate"] == [(1, f32(1e-4)), (2, f32(2e-4))]
    assert got["lm loss vs samples"] == [(8, 1.0), (16, 0.5)] and got["batch-size vs samples"] == [(8, 8.0),
                                                                                                  (16, 8.0)]
    assert got["learning-rate vs samples"][0] == (8, f32(1e-4)) and got["loss-scale vs samples"][0] == (8, 1.0)
    assert got["lm loss validation"] == [(200, 6.5)] and got["mtp loss validation"] == [(200, 7.0)]
    assert got["lm loss validation ppl"] == [(200, f32(math.exp(6.5)))]
    assert got["lm loss validation vs samples"] == [(16, 6.5)]
    assert set(got) == set(first) | {"lm loss vs samples", "learning-rate vs samples", "batch-size vs samples",
                                     "loss-scale vs samples", "lm loss validation", "lm loss validation ppl",
                                     "mtp loss validation", "lm loss validation vs samples"}


# --------------------------------------------------------------------------------------------- progress bar

def test_no_tty_has_no_bar_control_characters():
    class NotATTY(io.StringIO):
        def isatty(self):
            return False

    out = NotATTY()
    log = TrainLogger(None, train_iters=4, log_interval=2, stream=out)  # progress=None -> isatty()
    log.info("hello")
    for it in range(1, 5):
        log.log_train(it, metrics())
    log.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "hello" and len(lines) == 3
    assert lines[1].startswith(" iteration        2/       4 |") and lines[2].startswith(" iteration        4/")


def test_tty_bar_keeps_log_lines_whole():
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    out = FakeTTY()
    log = TrainLogger(None, train_iters=4, log_interval=2, stream=out)
    expected = []
    for it in range(1, 5):
        log.log_train(it, metrics(lm_loss=1.5))
        if it % 2 == 0:
            expected.append(f" iteration {it:8d}/       4 |")
    log.close()
    text = out.getvalue()
    assert "\r" in text and "loss=1.5000" in text and "4/4" in text  # a bar was drawn and finished
    # tqdm.write clears the bar, then writes each line whole on its own line.
    lines = [seg.split("\r")[-1] for seg in text.split("\n")]
    assert [ln[:len(expected[0])] for ln in lines if ln.startswith(" iteration")] == expected
