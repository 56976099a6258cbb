"""Compile the train step for a config and mesh (no run) and report what the compiled program does per device:
compiled FLOPs vs the analytic model FLOPs, bytes moved by each collective kind (parsed from the HLO text,
loop bodies multiplied by their trip counts), and memory (memory_analysis: arguments, outputs, temporaries).

    python scripts/bench_parallel.py --config configs/tiny.yaml --mesh dp=2,tp=2,ep=2 --devices 8
    python scripts/bench_parallel.py --config configs/air_proxy_4k.yaml --mesh dp=2,tp=2,ep=2 --devices 8 \
        --global_batch_size 4 --json air.json

--devices N runs on N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N). Any trainer flag
(`python -m jaxmoe.train --help`) after the script's own flags overrides the YAML. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="trainer YAML (may hold model_overrides)")
    p.add_argument("--mesh", default=None, help="e.g. dp=2,tp=2,ep=2 (default: the YAML's)")
    p.add_argument("--devices", type=int, default=None, help="fake CPU devices to create (CPU only)")
    p.add_argument("--small", action="store_true", help="the tiny model and a short batch (CPU smoke run)")
    p.add_argument("--json", default=None, help="write the report here")
    return p.parse_known_args(argv)


def report(args, flags) -> dict:
    import jax

    from jaxmoe import perf
    from jaxmoe.flops import traced_flops, train_flops_per_token

    force = {"mesh": args.mesh} if args.mesh is not None else {}
    t, c = perf.load_bench_config(args.config, flags, small=args.small, **force)
    n = len(jax.devices())
    ts = perf.TrainStep(t, c)
    t0 = time.perf_counter()
    compiled = ts.compile()
    compile_s = time.perf_counter() - t0
    tokens = ts.tokens_per_step
    analytic = train_flops_per_token(c, t.max_length, mtp=ts.mtp_layers > 0) * tokens
    traced = traced_flops(ts.jitted, ts.abstract_state(), ts.abstract_batch())
    cost = compiled.cost_analysis() or {}
    coll = perf.collective_bytes(compiled.as_text(), top=8)
    local_tokens = t.micro_batch_size * t.max_length  # one micro-batch on one data rank
    model = perf.collective_model(ts.par, local_tokens, c.hidden_size, ts.num_micro, c,
                                  compute_bytes=jax.numpy.dtype(t.dtype).itemsize)
    mem = perf.memory_summary(compiled)
    return {
        "config": args.config, "small": args.small, "mesh": ts.par.describe(), "devices": n,
        "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
        "params": perf.param_count(ts.par), "seq_len": t.max_length, "global_batch": t.global_batch_size,
        "num_micro": ts.num_micro, "tokens_per_step": tokens, "compile_s": round(compile_s, 1),
        "flops": {"analytic_per_device": analytic / n, "traced_per_device": traced / n,
                  "compiled_per_device": float(cost.get("flops", float("nan"))),
                  "traced_over_analytic": traced / analytic,
                  "compiled_over_analytic": float(cost.get("flops", float("nan"))) / (analytic / n)},
        "collectives": coll, "collective_model_min_payload": model,
        "memory": {**mem.get("memory_analysis", {}), "model": perf.step_memory_model(
            ts.par, jax.numpy.dtype(t.dtype).itemsize)},
    }


def print_report(r: dict) -> None:
    g = 2**30
    f = r["flops"]
    print(f"{r['config']} mesh {r['mesh']} on {r['devices']} {r['platform']} devices: {r['params'] / 1e6:.2f} M params, "
          f"{r['tokens_per_step']} tokens/step ({r['num_micro']} micro-batches), compile {r['compile_s']} s")
    print(f"FLOPs/device: analytic {f['analytic_per_device']:.4g}  traced {f['traced_per_device']:.4g} "
          f"({f['traced_over_analytic']:.3f}x)  compiled {f['compiled_per_device']:.4g} "
          f"({f['compiled_over_analytic']:.3f}x)")
    print(f"{'collective':<20}{'ops':>6}{'execs':>8}{'payload MiB':>14}{'wire MiB':>12}")
    for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "total"):
        x = r["collectives"][k]
        print(f"{k:<20}{x['ops']:>6}{x['executions']:>8}{x['payload_bytes'] / 2**20:>14.2f}{x['wire_bytes'] / 2**20:>12.2f}")
    if r["collectives"]["unknown_trip_counts"]:
        print(f"loops counted once (trip count unknown): {r['collectives']['unknown_trip_counts']}")
    for o in r["collectives"].get("top_ops", []):
        print(f"  largest: {o['name']:<22}{o['kind']:<20} group {o['group']}  x{o['executions']}  "
              f"{o['payload_bytes'] / 2**20:.2f} MiB")
    m = r["collective_model_min_payload"]
    print("analytic minimum payload MiB: " + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in m.items()))
    mem = r["memory"]
    if "arguments" in mem:
        print(f"memory/device GiB: arguments {mem['arguments'] / g:.3f}  outputs {mem['outputs'] / g:.3f}  "
              f"aliased {mem['aliased'] / g:.3f}  temps {mem['temps'] / g:.3f}  total {mem['total'] / g:.3f}")
    print("analytic weight-sized buffers GiB: " + ", ".join(f"{k} {v / g:.3f}" for k, v in mem["model"].items()))


def main(argv=None) -> int:
    args, flags = parse(argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    from jaxmoe.perf import run_cli
    return run_cli(report, print_report, args, flags)


if __name__ == "__main__":
    sys.exit(main())
