"""Time the trainer's train step on synthetic packed batches: tokens/s, median step time, model FLOPs per token,
MFU against the device's dense bf16 peak, and peak device memory.

    python scripts/bench_train.py --config configs/air_proxy_4k.yaml --steps 10 --warmup 2 --json air4k.json
    python scripts/bench_train.py --config configs/air_proxy_8k.yaml --mesh "" --json air8k.json
    python scripts/bench_train.py --config configs/air_proxy_4k.yaml --small      # tiny model on CPU, seconds

The step is the trainer's (jaxmoe.perf.TrainStep: build_parallel, model_options, optimizer, schedule, loss
options, ZeRO/TP/EP hooks, donated state). Model FLOPs per token = jaxmoe.flops.train_flops_per_token: 3x the
forward matmul FLOPs (forward + backward, remat recompute not counted) of attention (q/k/v/o projections +
causal QK^T and PV) and the MLPs counting routed top-k experts only (+ router, shared expert, LM head, MTP when
trained). MFU = that x tokens/s per device / peak (H100/H200 SXM 989 TFLOP/s; n/a on CPU). Any trainer flag
after the script's own flags overrides the YAML (e.g. --recompute_granularity selective).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="trainer YAML (may hold model_overrides)")
    p.add_argument("--mesh", default=None, help="e.g. tp=2,ep=4 (default: the YAML's; all visible devices)")
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--small", action="store_true", help="the tiny model and a short batch (CPU smoke run)")
    p.add_argument("--json", default=None, help="write the result here")
    args, flags = p.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got --steps {args.steps} --warmup {args.warmup}")
    return args, flags


def run(args, flags) -> dict:
    import jax
    import numpy as np

    from jaxmoe import perf
    from jaxmoe.flops import train_flops_per_token

    force = {"mesh": args.mesh} if args.mesh is not None else {}
    t, c = perf.load_bench_config(args.config, flags, small=args.small, **force)
    ts = perf.TrainStep(t, c, jax.devices()[:args.devices] if args.devices else None)
    state = ts.init_state()
    batches = [ts.batch(seed) for seed in range(2)]  # alternate two batches: no caching effects
    t0 = time.perf_counter()
    compiled = ts.jitted.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    loss = None
    for i in range(args.warmup):
        state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batches[i % 2])
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    loss = float(m["lm_loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"the benchmark step produced lm_loss {loss}; the timing is not of a valid step")
    n_dev = ts.par.mesh.size
    step_s = statistics.median(times)
    tokens = ts.tokens_per_step
    loss_tokens = int(ts.host_batch(0)["loss_mask"].sum())
    fpt = train_flops_per_token(c, t.max_length, mtp=ts.mtp_layers > 0)
    tps = tokens / step_s
    peak = perf.peak_bf16_flops()
    util = perf.mfu(fpt, tps / n_dev, peak) if t.dtype == "bfloat16" else None
    mem = perf.memory_summary(compiled)
    dev = jax.devices()[0]
    return {
        "config": args.config, "small": args.small, "device": dev.device_kind, "platform": dev.platform,
        "devices": n_dev, "mesh": ts.par.describe(), "dtype": t.dtype, "kernels": ts.opts.kernels,
        "remat": ts.opts.remat, "params": perf.param_count(ts.par), "seq_len": t.max_length,
        "global_batch": t.global_batch_size, "num_micro": ts.num_micro, "tokens_per_step": tokens,
        "loss_tokens_per_step": loss_tokens, "compile_s": round(compile_s, 2), "warmup": args.warmup,
        "steps": args.steps, "step_s_median": step_s, "step_s_all": times, "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / n_dev, "train_flops_per_token": fpt,
        "model_tflops_per_s_per_device": fpt * tps / n_dev / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None, "mfu": util, "lm_loss": loss, "memory": mem,
    }


def print_result(r: dict) -> None:
    g = 2**30
    mem = r["memory"]
    if "peak_bytes_in_use" in mem:
        mtxt = f"peak {mem['peak_bytes_in_use'] / g:.2f} GiB (memory_stats)"
    else:
        ma = mem.get("memory_analysis", {})
        mtxt = (f"planned {ma.get('total', 0) / g:.3f} GiB (memory_analysis: args {ma.get('arguments', 0) / g:.3f}, "
                f"temps {ma.get('temps', 0) / g:.3f})")
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"{r['config']}{' --small' if r['small'] else ''} on {r['devices']}x {r['device']} mesh {r['mesh']}: "
          f"{r['params'] / 1e6:.2f} M params, seq {r['seq_len']} x {r['global_batch']} rows, {r['dtype']}, "
          f"kernels {r['kernels']}, remat {r['remat']}")
    print(f"compile {r['compile_s']} s; step median {1e3 * r['step_s_median']:.1f} ms over {r['steps']} steps; "
          f"{r['tokens_per_s']:.1f} tokens/s ({r['tokens_per_s_per_device']:.1f} per device)")
    print(f"model FLOPs/token {r['train_flops_per_token'] / 1e9:.2f} G -> {r['model_tflops_per_s_per_device']:.3f} "
          f"TFLOP/s per device, MFU {mfu}; memory {mtxt}; lm_loss {r['lm_loss']:.3f}")


def main(argv=None) -> int:
    args, flags = parse(argv)
    from jaxmoe.perf import run_cli
    return run_cli(run, print_result, args, flags)


if __name__ == "__main__":
    sys.exit(main())
