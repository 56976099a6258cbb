"""Compile the trainer's own step for N simulated GPUs on a machine without one, and size it.

    pip install -e '.[cuda12]'          # the CUDA wheels; no driver or GPU needed
    python -m jaxmoe.aot --model glm4.5-air --gpus 32 --gpu_type h100 --mesh tp=4,ep=4,pp=2 \\
        --max_length 4096 --global_batch_size 16 --recompute_granularity full --json air.json

jax's compile-only GPU topology (jax.experimental.topologies, with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 so the
CUDA plugin registers without a driver) gives devices that XLA's real GPU pipeline compiles for, Triton
compilation of the Pallas kernels included. The step is the trainer's (train/build.py), built for the mesh's
platform: Pallas kernels compiled (not interpreted) and the ragged expert exchange, as on a GPU. Every trainer
flag is accepted (full fine-tuning, LoRA, pretraining, every mesh).

Reported per device: memory (XLA's buffer assignment: arguments, outputs, aliased, temps) and the headroom
against the device; collective payload and wire bytes per kind with the largest ops (jaxmoe.perf); Triton
kernels; model FLOPs (analytic); an estimated step time from a roofline (see `roofline`); compile time.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any


from jaxmoe import perf
from jaxmoe.config import ConfigError

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpu_targets")
INSTALL = "pip install -e '.[cuda12]'   (the CUDA 12 wheels of jax; no GPU or driver needed to compile)"


@dataclasses.dataclass(frozen=True)
class GpuType:
    """A GPU model and the interconnect of the usual 8-GPU host (HGX): NVLink inside a host, one InfiniBand NIC
    per GPU between hosts. Bandwidths are per GPU per direction, nominal link rates."""
    target: str  # GpuTargetConfigProto text file in assets/gpu_targets
    name: str
    memory_bytes: int  # as the device reports it (XLA's device_memory_size)
    peak_bf16: float  # dense FLOP/s
    nvlink_bw: float  # NVLink 4: 18 links x 25 GB/s = 450 GB/s per direction
    ib_bw: float  # NDR 400 Gb/s = 50 GB/s per GPU
    gpus_per_host: int = 8


GPUS = {
    "h100": GpuType("h100.txtpb", "NVIDIA H100 80GB HBM3 (SXM)", 84942979072, 989e12, 450e9, 50e9),
    "h200": GpuType("h200.txtpb", "NVIDIA H200 141GB HBM3e", 151397597184, 989e12, 450e9, 50e9),
}


class AotError(ValueError):
    """A setup problem of the AOT tool (missing CUDA wheels, an impossible GPU count); the message says the fix."""


def gpu_devices(gpu: GpuType, n: int, per_host: int | None = None) -> list:
    """n compile-only devices of type `gpu`, numbered host by host (topology 1 x hosts x per_host)."""
    per_host = min(per_host or gpu.gpus_per_host, n)
    if n < 1 or n % per_host:
        raise AotError(f"--gpus {n}: must be a positive multiple of --gpus_per_host {per_host} (whole hosts)")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the plugin registers without a driver
    if importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("jax_cuda13_plugin") is None:
        raise AotError(f"compiling for GPUs needs jax's CUDA plugin, which is not installed here: {INSTALL}")
    from jax.experimental import topologies
    with open(os.path.join(TARGETS, gpu.target)) as f:
        target = f.read()
    topo = topologies.get_topology_desc("jaxmoe-aot", "cuda", target_config=target,
                                        topology=f"1x{n // per_host}x{per_host}")
    return list(topo.devices)


def triton_kernels(hlo_text: str) -> dict[str, int]:
    """Pallas kernels lowered through Triton (custom calls) and XLA's own Triton fusions in a compiled module."""
    pallas = len(re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton"', hlo_text))
    fusions = len(re.findall(r'"kind":"__triton[a-z_]*"', hlo_text))
    # collectives the partitioner put on a kernel's operands: a kernel left to GSPMD (not in a shard_map)
    # gets them all-gathered and its work repeated on every device (sharding.Sharding.kernel)
    around = len(re.findall(r"= [^\n]*(?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                            r"(?:-start)?\([^\n]*op_name=\"[^\"]*pallas_call", hlo_text))
    return {"pallas": pallas, "xla_triton_fusions": fusions, "collectives_on_kernel_operands": around}


def roofline(flops_per_device: float, ops: list[dict], gpu: GpuType, per_host: int, mfu: float,
             link_efficiency: float, num_devices: int = 0) -> dict[str, float]:
    """Estimated step time: compute at `mfu` of the bf16 peak, plus each collective's wire bytes at NVLink
    bandwidth when every group stays inside one host and at InfiniBand bandwidth when a group spans hosts
    (unparsed groups count as spanning), both at `link_efficiency` of the nominal rate. `serial` adds the two
    (no overlap); `overlapped` takes the larger (perfect overlap of communication with compute)."""
    compute = flops_per_device / (gpu.peak_bf16 * mfu)
    nvlink = ib = 0.0
    for o in ops:
        if o["kind"] == "collective-permute":
            span = _permute_span(o["attrs"], per_host)
        else:
            span = perf.hosts_spanned(perf.replica_groups(o["attrs"], num_devices), per_host)
        if span == 1:
            nvlink += o["wire_bytes"]
        else:
            ib += o["wire_bytes"]
    comm = nvlink / (gpu.nvlink_bw * link_efficiency) + ib / (gpu.ib_bw * link_efficiency)
    return {"compute_s": compute, "comm_s": comm, "nvlink_wire_bytes": nvlink, "ib_wire_bytes": ib,
            "serial_s": compute + comm, "overlapped_s": max(compute, comm)}


def _permute_span(attrs: str, per_host: int) -> int:
    pairs = re.findall(r"\{(\d+),(\d+)\}", attrs.split("source_target_pairs=", 1)[-1])
    return 2 if any(int(a) // per_host != int(b) // per_host for a, b in pairs) else 1


def kernel_choices(opts) -> dict[str, str]:
    """'pallas' or 'reference' per op, as the step resolves --kernels for its platform."""
    from jaxmoe.kernels.ops import OPS
    from jaxmoe.model.layers import ops_for
    ops = ops_for(opts)
    return dict(getattr(ops, "choice", {op: "reference" for op in OPS}))


def model_flops_per_step(t, c) -> float:
    """Model FLOPs of one step (jaxmoe.flops): 3 x forward for full training; 2 x forward under LoRA (the
    frozen base needs input gradients only; the adapters' own FLOPs are negligible). Recompute not counted."""
    from jaxmoe.flops import forward_flops_per_token
    mtp = (c.num_nextn_predict_layers if t.mtp_num_layers is None else t.mtp_num_layers) > 0
    per_token = forward_flops_per_token(c, t.max_length, mtp=mtp) * (3 if t.train_type == "full" else 2)
    return per_token * t.global_batch_size * t.max_length


def compile_report(t, c, devices, gpu: GpuType, per_host: int, mfu: float = 0.4, link_efficiency: float = 0.8,
                   top: int = 10, keep_hlo: bool = False) -> dict[str, Any]:
    """Build the trainer's step for `devices`, compile it, and measure it (see the module docstring).
    `keep_hlo`: the report's "hlo" is the optimized per-device HLO text (for tests; not printed)."""
    from jaxmoe.parallel.setup import build_parallel
    from jaxmoe.train.build import build_step

    par = build_parallel(t, c, devices)
    built = build_step(t, c, par, t.train_iters or 1000)
    t0 = time.perf_counter()
    lowered = built.step.lower(built.abstract_state(), perf.abstract_batch(par, t.global_batch_size, t.max_length),
                               built.abstract_frozen())
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    coll = perf.collective_bytes(hlo, top=top, with_ops=True,
                                 ragged_buffer_factor=getattr(par.dispatch, "buffer_factor", None))
    flops = model_flops_per_step(t, c) / len(devices)
    return {
        "gpu": gpu.name, "gpus": len(devices), "gpus_per_host": per_host, "mesh": par.describe(),
        "model": {"params": perf.param_count(par), "layers": c.num_hidden_layers, "experts": c.n_routed_experts},
        "train_type": t.train_type, "seq_len": t.max_length, "global_batch": t.global_batch_size,
        "micro_batch": t.micro_batch_size, "num_micro": built.num_micro, "kernels": kernel_choices(built.opts),
        "transport": getattr(par.dispatch, "transport", None),
        "memory": {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
                   "aliased": ma.alias_size_in_bytes, "temps": ma.temp_size_in_bytes, "total": total,
                   "device": gpu.memory_bytes, "headroom": gpu.memory_bytes - total},
        "collectives": {k: coll[k] for k in perf.KINDS + ("total",)},
        "collective_model": perf.collective_model(par, t.micro_batch_size * t.max_length, c.hidden_size,
                                                  built.num_micro, c, recompute=t.recompute_granularity == "full"),
        "top_collectives": coll.get("top_ops", []), "unknown_trip_counts": len(coll["unknown_trip_counts"]),
        "live_payload": (perf.pipeline_live_payload(coll["ops"], built.num_micro, par.pipeline)
                         if par.pipeline is not None else coll["total"]["payload_bytes"]),
        "triton_kernels": triton_kernels(hlo), "model_flops_per_device": flops,
        "roofline": {**roofline(flops, coll["ops"], gpu, per_host, mfu, link_efficiency, len(devices)),
                     "mfu_assumed": mfu, "link_efficiency": link_efficiency},
        "compile_seconds": seconds,
        **({"hlo": hlo} if keep_hlo else {}),
    }


# ---- command line ----------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def _kernels(choice: dict) -> str:
    kinds = set(choice.values())
    return kinds.pop() if len(kinds) == 1 else ",".join(f"{k}={v}" for k, v in choice.items())


def show(r: dict, out=sys.stdout) -> None:
    m, rf, col = r["memory"], r["roofline"], r["collectives"]
    step = rf["serial_s"]
    p = lambda s: print(s, file=out)
    p(f"> compiled for {r['gpus']} x {r['gpu']} ({r['gpus_per_host']} per host), mesh {r['mesh']}, "
      f"{r['train_type']}, seq {r['seq_len']}, global batch {r['global_batch']} ({r['num_micro']} micro-batch(es) "
      f"of {r['micro_batch']}), kernels {_kernels(r['kernels'])}, transport {r['transport']}, "
      f"in {r['compile_seconds']:.0f} s")
    p(f"> memory per device: arguments {_gib(m['arguments'])} + temps {_gib(m['temps'])} + outputs "
      f"{_gib(m['outputs'])} - aliased {_gib(m['aliased'])} = {_gib(m['total'])} of {_gib(m['device'])} "
      f"({'headroom ' + _gib(m['headroom']) if m['headroom'] >= 0 else 'DOES NOT FIT by ' + _gib(-m['headroom'])})")
    p(f"> collectives per device per step: payload {col['total']['payload_bytes'] / 1e9:.2f} GB, wire "
      f"{col['total']['wire_bytes'] / 1e9:.2f} GB ({rf['nvlink_wire_bytes'] / 1e9:.2f} GB NVLink, "
      f"{rf['ib_wire_bytes'] / 1e9:.2f} GB InfiniBand)")
    if "collective_model" in r:
        m = r["collective_model"]
        parts = ", ".join(f"{k} {m[k] / 1e9:.1f}" for k in ("grad_reduce", "param_gather", "tensor", "expert",
                                                            "pipeline") if m.get(k))
        p(f"> analytic minimum payload (jaxmoe.perf.collective_model) {m['total'] / 1e9:.2f} GB ({parts}): the "
          f"step moves {col['total']['payload_bytes'] / max(m['total'], 1):.2f}x that")
        if r["live_payload"] != col["total"]["payload_bytes"]:
            p(f"> at run time the pipeline's bubble iterations and empty layer slots send no expert rows: "
              f"{r['live_payload'] / 1e9:.2f} GB, {r['live_payload'] / max(m['total'], 1):.2f}x the minimum")
    for k in perf.KINDS:
        if col[k]["executions"]:
            p(f"    {k:<19} {col[k]['executions']:>6} executions  payload {col[k]['payload_bytes'] / 1e9:9.3f} GB")
    p("  largest collectives:")
    for o in r["top_collectives"]:
        p(f"    {o['kind']:<19} group {o['group']:>3}  x{o['executions']:<5} payload {o['payload_bytes'] / 1e9:8.3f} GB"
          f"  {o['name']} in {o['computation']}")
    tk = r["triton_kernels"]
    p(f"> Triton: {tk['pallas']} Pallas kernels, {tk['xla_triton_fusions']} XLA Triton fusions, "
      f"{tk.get('collectives_on_kernel_operands', 0)} collectives on kernel operands")
    p(f"> model FLOPs per device per step {r['model_flops_per_device'] / 1e12:.1f} TFLOP; roofline: compute "
      f"{rf['compute_s']:.3f} s at {rf['mfu_assumed']:.0%} MFU + communication {rf['comm_s']:.3f} s at "
      f"{rf['link_efficiency']:.0%} of the link rates = {step:.3f} s per step (MFU {r['estimated_mfu']:.1%}; "
      f"{rf['overlapped_s']:.3f} s with perfect overlap)")


def load_train_config(argv: list[str]):
    """Trainer flags (a --config YAML may carry `model_overrides`, as the bench configs do) -> (t, c)."""
    from jaxmoe.train.args import parse_args
    from jaxmoe.train.loop import resolve_model
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML path")
        return perf.load_bench_config(argv[i + 1], argv[:i] + argv[i + 2:])
    t = parse_args(argv)
    c = resolve_model(t)[0]
    return t, c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxmoe.aot",
        description="Compile the trainer's step for simulated GPUs (no GPU needed; needs the CUDA wheels: "
                    f"{INSTALL}) and report per-device memory, collectives, Triton kernels and a roofline step "
                    "time. Every other flag is a `python -m jaxmoe.train` flag (see its --help).")
    p.add_argument("--gpus", type=int, required=True, help="Number of GPUs to compile for (whole hosts).")
    p.add_argument("--gpu_type", choices=sorted(GPUS), default="h100", help="GPU model (target description).")
    p.add_argument("--gpus_per_host", type=int, default=8, help="GPUs per host (NVLink domain).")
    p.add_argument("--mfu", type=float, default=0.4, help="Compute efficiency assumed by the roofline.")
    p.add_argument("--link_efficiency", type=float, default=0.8,
                   help="Fraction of the nominal NVLink / InfiniBand rates the collectives reach in the roofline.")
    p.add_argument("--top", type=int, default=10, help="How many of the largest collectives to list.")
    p.add_argument("--json", help="Also write the report as JSON to this path.")
    return p


def run(argv: list[str] | None = None, out=sys.stdout) -> dict:
    args, rest = build_parser().parse_known_args(argv)
    gpu = GPUS[args.gpu_type]
    t, c = load_train_config(rest)
    devices = gpu_devices(gpu, args.gpus, args.gpus_per_host)
    r = compile_report(t, c, devices, gpu, min(args.gpus_per_host, args.gpus), args.mfu, args.link_efficiency,
                       args.top)
    r["estimated_mfu"] = r["model_flops_per_device"] / (r["roofline"]["serial_s"] * gpu.peak_bf16)
    r["command"] = "python -m jaxmoe.aot " + " ".join(argv if argv is not None else sys.argv[1:])
    show(r, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


def main(argv: list[str] | None = None) -> int:
    from jaxmoe.mesh import MeshError
    # the running backend only traces; on a GPU box too (the devices are the simulated ones)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        run(argv)
    except (AotError, ConfigError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
