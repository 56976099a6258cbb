"""Performance accounting shared by the benchmarks and the CPU proxy tests.

  collective_bytes(hlo_text)     bytes moved by each collective kind in a compiled (SPMD-partitioned) HLO module,
                                 with ops inside while loops multiplied by the loop trip count
  state_bytes_per_device(par)    fp32 master params + Adam moments each device holds under a Parallel's shardings
  collective_model(...)          the analytic minimum payload of the collectives one step of a mesh needs
  peak_bf16_flops / mfu          device peak table and model-FLOPs utilisation
  memory_summary(compiled)       peak device memory (memory_stats on GPU) or the compiled memory_analysis

HLO conventions (per-device programs after SPMD partitioning, so every shape is one device's buffer):
  payload  = the full logical buffer a collective works on: the operand for all-reduce / reduce-scatter /
             all-to-all / collective-permute, operand x group size for all-gather (the gathered result).
  wire     = bytes one device sends under the bandwidth-optimal (ring) algorithm: all-reduce 2(n-1)/n payload,
             all-gather / reduce-scatter / all-to-all (n-1)/n payload, collective-permute the operand when the
             device's target is another device (self pairs move nothing).
Trip counts: XLA writes `known_trip_count` into a while op's backend_config; without it the loop's condition
computation is read for one integer constant compared against the induction variable (counted from 0, step 1).
Loops whose count neither gives are counted once and listed under `unknown_trip_counts`.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}

# Dense bf16 peak FLOP/s per device (vendor spec sheets, without sparsity). Matched against device_kind.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is lower (756) and reports "H100 PCIe"
    ("A100", 312e12),
)
PEAK_BF16_PCIE = {"H100 PCIe": 756e12}


def peak_bf16_flops(device=None) -> float | None:
    """Dense bf16 peak of `device` (default: the first device), or None where unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16_PCIE.items():
        if name in kind:
            return peak
    for name, peak in PEAK_BF16:
        if name in kind:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_sec_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_sec_per_device / peak


# ---- HLO text parsing ---------------------------------------------------------------------------------------

_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(calls|branch_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(type_text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(type_text):
        if dt in DTYPE_BYTES:
            total += DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[]) all-to-all(%a, %b), ...' -> (type text, 'all-to-all(%a, %b), ...')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].strip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _operands(call: str) -> list[str]:
    """'op(%a, %b.1), attrs' -> ['a', 'b.1'] (operand names of the first parenthesised list)."""
    start = call.index("(")
    depth = 0
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", call[start:i + 1])
    return []


def _group_size(attrs: str, num_partitions: int) -> int:
    m = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if m:
        return max(1, len([x for x in m.group(1).strip("{}").split(",") if x.strip()]))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        axes = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[a]) for a in axes) if axes else 1
    return num_partitions  # replica_groups={} (or absent): every device


def replica_groups(attrs: str, num_partitions: int) -> list[list[int]] | None:
    """The device groups of a collective: explicit `{{0,1},{2,3}}`, iota `[G,S]<=[dims]T(perm)` (iota over
    dims, transposed by perm, reshaped to G groups of S), `mesh['a'=4,'b'=2] {'a'}` (along named axes of an
    iota mesh), or `{}` (every device). Ids are partition ids (the mesh's device order). None where not parsed."""
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        return groups or [list(range(num_partitions))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:  # groups along the named axes of an iota device mesh
        sizes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        along = re.findall(r"'([^']+)'", m.group(2))
        names = [a for a, _ in sizes]
        ids = np.arange(math.prod(n for _, n in sizes)).reshape([n for _, n in sizes])
        keep = [i for i, a in enumerate(names) if a not in along] + [names.index(a) for a in along]
        return ids.transpose(keep).reshape(-1, math.prod(dict(sizes)[a] for a in along)).tolist()
    if "replica_groups" not in attrs:
        return [list(range(num_partitions))]
    return None


def hosts_spanned(groups: list[list[int]] | None, devices_per_host: int) -> int | None:
    """The most hosts any one group spans (devices numbered host by host); None where groups are unknown."""
    if groups is None:
        return None
    return max(len({d // devices_per_host for d in g}) for g in groups)


def parse_hlo(text: str) -> dict[str, Any]:
    """-> {'entry': name, 'num_partitions': n, 'comps': {name: [instr dict]}}."""
    comps: dict[str, list[dict]] = {}
    entry, cur = None, None
    m = re.search(r"num_partitions=(\d+)", text)
    num_partitions = int(m.group(1)) if m else 1
    for line in text.splitlines():
        if cur is None:
            h = _COMP_HEAD.match(line)
            if h and not line.startswith("HloModule"):
                cur = h.group(2)
                comps[cur] = []
                if h.group(1):
                    entry = cur
            continue
        if line.startswith("}"):
            cur = None
            continue
        im = _INSTR.match(line)
        if not im:
            continue
        name, rest = im.groups()
        type_text, call = _split_type(rest.strip())
        op = call.split("(", 1)[0].strip()
        comps[cur].append({"name": name, "type": type_text, "op": op, "call": call})
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation; pass compiled.as_text() of a compiled jit function")
    return {"entry": entry, "num_partitions": num_partitions, "comps": comps}


def _trip_count(instr: dict, comps: dict) -> int | None:
    m = _TRIP.search(instr["call"])
    if m:
        return int(m.group(1))
    cm = re.search(r"condition=%([\w.\-]+)", instr["call"])
    if not cm or cm.group(1) not in comps:
        return None
    consts = [int(x) for i in comps[cm.group(1)] if i["op"] == "constant" and i["type"].startswith(("s32[]", "s64[]"))
              for x in re.findall(r"constant\((-?\d+)\)", i["call"])]
    return consts[0] if len(consts) == 1 else None


def computation_multiplicity(mod: dict) -> tuple[dict[str, int], list[str]]:
    """How many times each computation runs per call of the entry (while bodies x trip count)."""
    comps = mod["comps"]
    mult = {mod["entry"]: 1}
    unknown: list[str] = []
    # Computations form a DAG below the entry; visit callers before callees (reverse post-order).
    order, seen = [], set()

    def visit(c):
        if c in seen or c not in comps:
            return
        seen.add(c)
        for i in comps[c]:
            for _, callee in _callees(i):
                visit(callee)
        order.append(c)

    visit(mod["entry"])
    for c in reversed(order):
        for i in comps[c]:
            for role, callee in _callees(i):
                k = 1
                if i["op"] == "while" and role in ("body", "condition"):
                    n = _trip_count(i, comps)
                    if n is None:
                        unknown.append(i["name"])
                        n = 1
                    k = n + (role == "condition")
                mult[callee] = mult.get(callee, 0) + mult.get(c, 0) * k
    return mult, unknown


def _callees(instr: dict):
    call = instr["call"]
    for role, name in _CALLEE.findall(call):
        yield role, name
    for role, names in _CALLEE_LIST.findall(call):
        for n in re.findall(r"%([\w.\-]+)", names):
            yield role, n


def collective_bytes(hlo_text: str, top: int = 0, with_ops: bool = False,
                     ragged_buffer_factor: float | None = None) -> dict[str, Any]:
    """Per collective kind: ops (static count), executions (x trip counts), payload and wire bytes per device
    per call of the module. Async pairs count once (at `-start`); groups of one device move nothing. With
    `top`, also the `top` ops of largest total payload (name, kind, group size, executions, payload); with
    `with_ops`, every op with its attributes (replica groups: see replica_groups). `ragged_buffer_factor`: the
    EP dispatch buffer's size over the rows it sends (moe/ep.py `dispatch.buffer_factor`; default the group
    size, the dropless worst case)."""
    mod = parse_hlo(hlo_text)
    mult, unknown = computation_multiplicity(mod)
    n_dev = mod["num_partitions"]
    out = {k: {"ops": 0, "executions": 0, "payload_bytes": 0, "wire_bytes": 0.0} for k in KINDS}
    ops: list[dict] = []
    for cname, instrs in mod["comps"].items():
        times = mult.get(cname, 0)
        if not times:
            continue
        types = {i["name"]: i["type"] for i in instrs}
        for i in instrs:
            op = i["op"]
            kind = op[:-6] if op.endswith("-start") else op
            if kind not in out or op.endswith("-done"):
                continue
            names = _operands(i["call"])
            if kind == "ragged-all-to-all":  # (input, output, offsets and sizes): rows of the input move
                names = names[:1]
            operand = sum(shape_bytes(types.get(o, "")) for o in names)
            n = _group_size(i["call"], n_dev)
            if n == 1 and kind != "collective-permute":
                payload, wire = 0, 0.0
            elif kind == "all-gather":
                payload, wire = operand * n, operand * (n - 1)
            elif kind == "all-reduce":
                payload, wire = operand, 2 * operand * (n - 1) / n
            elif kind == "collective-permute":
                pairs = re.findall(r"\{(\d+),(\d+)\}", i["call"].split("source_target_pairs=", 1)[-1])
                moving = sum(a != b for a, b in pairs)
                payload, wire = operand, operand * moving / max(n_dev, 1)
            elif kind == "ragged-all-to-all":  # only the rows its sizes name move (known at run time); the
                # dropless EP dispatch sends n*k rows from a buffer of ep x n*k (moe/ep.py): 1/n of the buffer,
                # of a bounded buffer (F x n*k rows) 1/F
                over = n if ragged_buffer_factor is None else min(max(ragged_buffer_factor, 1.0), n)
                payload, wire = operand / over, operand * (n - 1) / n / over
            else:  # reduce-scatter, all-to-all
                payload, wire = operand, operand * (n - 1) / n
            ops.append({"name": i["name"], "kind": kind, "group": n, "executions": times,
                        "payload_bytes": times * payload, "wire_bytes": times * wire, "computation": cname,
                        "attrs": i["call"]})
            rec = out[kind]
            rec["ops"] += 1
            rec["executions"] += times
            rec["payload_bytes"] += times * payload
            rec["wire_bytes"] += times * wire
    out["total"] = {k: sum(out[x][k] for x in KINDS) for k in ("ops", "executions", "payload_bytes", "wire_bytes")}
    out["unknown_trip_counts"] = unknown
    out["num_partitions"] = n_dev
    if with_ops:
        out["ops"] = ops
    if top:
        out["top_ops"] = [{k: v for k, v in o.items() if k != "attrs"}
                          for o in sorted(ops, key=lambda o: -o["payload_bytes"])[:top]]
    return out


# ---- analytic models ----------------------------------------------------------------------------------------

def local_elements(shardings, shapes) -> int:
    """Elements one device holds of a tree of arrays (shape structs) under matching NamedShardings."""
    return sum(int(np.prod(sh.shard_shape(s.shape))) for sh, s in
               zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)))


def state_bytes_per_device(par) -> int:
    """fp32 master params + Adam mu and nu (12 bytes/param) in the train state's layout (ZeRO-1; the MoE stack
    staged under the pipeline, its empty layer slots included)."""
    return 12 * local_elements(par.storage_shardings, par.storage_shapes)


def step_memory_model(par, compute_bytes: int = 2) -> dict[str, int]:
    """Analytic per-device bytes of the weight-sized buffers of one train step (activations excluded):
    state (master + moments, ZeRO layout), the compute copy of the weights (TP/EP layout), one micro-batch's
    gradient in the compute layout, and the fp32 gradient accumulator (ZeRO layout)."""
    zero = local_elements(par.storage_shardings, par.storage_shapes)
    comp = local_elements(par.param_shardings, par.param_shapes)
    return {"state": 12 * zero, "compute_params": compute_bytes * comp, "micro_grads": compute_bytes * comp,
            "grad_accumulator": 4 * zero, "total": 16 * zero + 2 * compute_bytes * comp}


def param_count(par) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(par.param_shapes))


def _mesh_axes(sharding) -> set[str]:
    axes = set()
    for part in sharding.spec:
        axes.update(part if isinstance(part, tuple) else (() if part is None else (part,)))
    return axes


def pipeline_live_payload(ops: list[dict], num_micro: int, layout) -> float:
    """Run-time payload of collective_bytes' `ops` under the pipeline `layout` (parallel/pipeline.py): a ragged
    exchange run once per layer slot and iteration ((M + S - 1) x slots times) moves rows only where a
    micro-batch is live in a real layer (moe_mlp's `send`), M x n_s of them on stage s; the busiest stage's
    share, M / (M + S - 1), is applied. Every other op moves what the static count says."""
    per_step = (num_micro + layout.stages - 1) * layout.slots
    live = num_micro / (num_micro + layout.stages - 1)
    return sum(o["payload_bytes"] * (live if o["kind"] == "ragged-all-to-all" and o["executions"] % per_step == 0
                                     else 1.0) for o in ops)


def collective_model(par, tokens_per_micro: int, hidden: int, num_micro: int, c=None,
                     compute_bytes: int = 2, recompute: bool = False) -> dict[str, float]:
    """Analytic payload bytes per device of one step's collectives (see docs/performance.md):
      grad_reduce:  the gradient of every weight replicated over a token-splitting axis (data, expert, sequence)
                    summed over that axis, once per step (summing commutes with micro-batch accumulation, as
                    in Megatron's DDP): payload = the weight's compute-layout shard. The embedding is left out:
                    its gradient can be scattered from the gathered token cotangents instead (XLA does);
      grad_reduce_per_micro: the same sum per micro-batch incl. the embedding: the upper end, what the GSPMD
                    path does (tp / cp meshes; data/expert-only meshes reduce once, parallel/manual.py);
      param_gather: ZeRO-1 keeps master weights split over every axis they are replicated on: their compute
                    copies are gathered once a step;
      tensor:       Megatron TP, 2 all-reduces of the [tokens, hidden] activations per block forward and 2 in
                    backward (attention out, MLP out), per layer incl. MTP;
      expert:       each token's top-k copies sent to their experts and back, forward and backward (4 passes),
                    the share (ep-1)/ep leaving the device, [copies, hidden] rows.
      pipeline:     (pp > 1) each stage's output hidden states handed to the next stage once per iteration
                    forward and backward, and the embedded inputs / last-stage outputs, computed by the stages in
                    shares, replicated to every stage (an all-gather of M hidden states each, both passes).
    Under pp a device holds and runs its stage's layers only (1/pp of the layer stack's weights, gradients
    and per-layer traffic); the dense layers and MTP are replicated over the stages, which share their
    micro-batches, so their gradient is summed over `stage` too (the embedding and head are split over `stage`
    by vocab: their sharding says so, and their lookups' and logits' reductions are not modeled).
    `recompute` (--recompute_granularity full): the backward pass recomputes each layer's forward once, so
    the tensor and expert traffic of the forward happens twice (6 passes instead of 4), in Megatron too.
    `total` (the minimum) leaves out grad_reduce_per_micro. tokens_per_micro: rows x length of one micro-batch
    of one data rank; TP activations are per sequence shard (tokens / cp), MoE tokens are split over tensor and
    sequence too (tokens / (tp cp))."""
    spec = par.spec
    S = spec.stage
    sizes = {"data": spec.data, "expert": spec.expert, "sequence": spec.sequence, "stage": S}
    reduce = reduce_all = gather = 0
    flat = jax.tree_util.tree_flatten_with_path(par.param_shapes)[0]
    for (path, s), psh, msh in zip(flat, jax.tree.leaves(par.param_shardings), jax.tree.leaves(par.master_shardings)):
        local = compute_bytes * int(np.prod(psh.shard_shape(s.shape)))
        used = _mesh_axes(psh)
        if S > 1 and jax.tree_util.keystr(path).startswith("['moe']"):
            local, used = local // S, used | {"stage"}
        if any(n > 1 and ax not in used for ax, n in sizes.items()):
            reduce_all += local
            if jax.tree_util.keystr(path) != "['embed']":
                reduce += local
        if _mesh_axes(msh) - used:  # ZeRO-split over some replica axis: gathered into the compute layout
            gather += local
    out = {"grad_reduce": float(reduce), "param_gather": float(gather), "tensor": 0.0, "expert": 0.0,
           "pipeline": 0.0}
    sp = dict(par.sharding.rules).get("length") != "sequence"  # sequence parallel: tokens split over tensor too
    hidden_bytes = tokens_per_micro // (spec.sequence * (spec.tensor if sp else 1)) * hidden * compute_bytes
    if S > 1:
        out["pipeline"] = (2.0 * (num_micro + S - 1) + 4.0 * num_micro * (S - 1) / S) * hidden_bytes
    if c is not None:
        layers = (c.num_hidden_layers + c.num_nextn_predict_layers) / S
        passes = 6.0 if recompute else 4.0
        if spec.tensor > 1:
            out["tensor"] = passes * layers * tokens_per_micro // spec.sequence * hidden * compute_bytes * num_micro
        ep = spec.ep_size  # the expert-parallel group, folded tensor / sequence ranks included
        if ep > 1:
            moe_layers = (c.num_moe_layers + c.num_nextn_predict_layers) / S
            copies = tokens_per_micro // (spec.tensor * spec.sequence) * c.num_experts_per_tok
            out["expert"] = passes * moe_layers * copies * hidden * compute_bytes * num_micro * (ep - 1) / ep
    out["total"] = sum(out.values())
    out["grad_reduce_per_micro"] = float(reduce_all * num_micro)
    return out


# ---- memory -------------------------------------------------------------------------------------------------

def memory_summary(compiled=None, device=None) -> dict[str, Any]:
    """Peak device memory: the allocator's peak on GPU/TPU (memory_stats), else the compiled step's
    memory_analysis (arguments + outputs - aliased + temporaries: what XLA's buffer assignment plans)."""
    device = device or jax.devices()[0]
    out: dict[str, Any] = {}
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU client: no allocator stats
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        out["bytes_limit"] = int(stats.get("bytes_limit", 0))
        out["source"] = "memory_stats"
    if compiled is not None:
        ma = compiled.memory_analysis()
        if ma is not None:
            args, outs = ma.argument_size_in_bytes, ma.output_size_in_bytes
            alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
            out["memory_analysis"] = {"arguments": args, "outputs": outs, "aliased": alias, "temps": temp,
                                      "total": args + outs - alias + temp}
            out.setdefault("source", "memory_analysis")
    return out


def gib(x: float) -> float:
    return x / 2**30


# ---- the trainer's step, for benchmarks ----------------------------------------------------------------------

def synthetic_packed_batch(rows: int, length: int, vocab: int, seed: int = 0, mean_doc: int | None = None) -> dict:
    """Packed rows of random documents (lengths ~ exponential around mean_doc, default length/4), laid out as
    the SFT packer lays them out: positions restart and segment ids count up per document, labels are the next
    token inside each document, no loss on a document's last token."""
    rng = np.random.default_rng(seed)
    mean_doc = mean_doc or max(2, length // 4)
    ids = rng.integers(1, vocab, size=(rows, length), dtype=np.int32)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        t, s = 0, 1
        while t < length:
            n = int(min(length - t, max(2, rng.exponential(mean_doc))))
            seg[r, t:t + n], pos[r, t:t + n] = s, np.arange(n)
            t, s = t + n, s + 1
    nxt = np.roll(ids, -1, axis=1)
    last = np.ones_like(seg, bool)
    last[:, :-1] = seg[:, 1:] != seg[:, :-1]
    labels = np.where(last, 0, nxt).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "loss_mask": (~last).astype(np.float32), "positions": pos,
            "segment_ids": seg}


class TrainStep:
    """The train step exactly as `jaxmoe.train.loop.run` builds it for full fine-tuning (train/build.py: same
    parallel setup, model options, optimizer, schedule, loss options, hooks and donation), without data or
    checkpoints."""

    def __init__(self, t, c, devices=None, train_iters: int = 1000):
        from jaxmoe.config import ConfigError
        from jaxmoe.parallel.setup import build_parallel
        from jaxmoe.train.build import build_step

        if t.train_type != "full":
            raise ConfigError(f"--train_type {t.train_type}: the benchmarks time full fine-tuning only")
        self.t, self.c = t, c
        self.par = build_parallel(t, c, devices)
        self.built = build_step(t, c, self.par, train_iters)
        self.opts, self.optimizer, self.num_micro = self.built.opts, self.built.optimizer, self.built.num_micro
        self.lo, self.mtp_layers = self.built.lo, self.built.lo.mtp_layers
        self.fn, self.jitted = self.built.step_fn, self.built.step

    @property
    def tokens_per_step(self) -> int:
        return self.t.global_batch_size * self.t.max_length

    def init_state(self):
        """Random fp32 master weights + optimizer state, placed as the trainer places them."""
        from jaxmoe.model.params import init_params, init_state

        par = self.par
        params = jax.jit(lambda k: init_params(self.c, k), out_shardings=par.master_shardings)(
            jax.random.key(self.t.seed))
        mstate = jax.device_put(init_state(self.c), par.replicated)
        return par.init_train_state(params, mstate, self.optimizer)

    def abstract_state(self):
        """The train state as sharded shape structs: compile without allocating the weights."""
        return self.built.abstract_state()

    def host_batch(self, seed: int = 0) -> dict:
        return synthetic_packed_batch(self.t.global_batch_size, self.t.max_length, self.c.vocab_size, seed)

    def batch(self, seed: int = 0) -> dict:
        return self.par.put_batch(self.host_batch(seed))

    def abstract_batch(self) -> dict:
        return abstract_batch(self.par, self.t.global_batch_size, self.t.max_length)

    def compile(self, state=None, batch=None):
        return self.jitted.lower(state if state is not None else self.abstract_state(),
                                 batch if batch is not None else self.abstract_batch()).compile()


def abstract_batch(par, rows: int, length: int) -> dict:
    """A global batch of `rows` packed rows as sharded shape structs (the trainer's batch fields)."""
    sh = par.batch_sharding()
    fields = par.batch.host_fields(synthetic_packed_batch(1, length, 16))  # + the context-parallel fields
    return {k: jax.ShapeDtypeStruct((rows, length), v.dtype, sharding=sh) for k, v in fields.items()}


# ---- benchmark configs ---------------------------------------------------------------------------------------

# --small: the tiny model without its MTP layer (smaller program, faster CPU compile), two rows of 128 tokens
SMALL = dict(model="tiny", max_length=128, micro_batch_size=1, global_batch_size=2, kernels="reference",
             recompute_granularity=None, mtp_num_layers=0)


def load_bench_config(path: str, flags: list[str] | None = None, small: bool = False, **force):
    """A trainer YAML (+ trainer flags) -> (TrainConfig, ModelConfig), parsed by the trainer's own parser.
    One extra key is read here: `model_overrides`, a mapping of ModelConfig fields that replace those of
    `model` (the proxies: GLM-4.5-Air width with few layers). `small` swaps in the tiny model and a short
    batch (CPU smoke runs); `force` sets TrainConfig fields last (e.g. a mesh)."""
    import dataclasses
    import os
    import tempfile

    import yaml

    from jaxmoe.config import ConfigError, ModelConfig
    from jaxmoe.train.args import parse_args
    from jaxmoe.train.loop import resolve_model

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of flag: value")
    overrides = raw.pop("model_overrides", None) or {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(overrides, dict) or set(overrides) - fields:
        bad = sorted(set(overrides) - fields) if isinstance(overrides, dict) else overrides
        raise ConfigError(f"{path}: model_overrides {bad!r}: expected a mapping of ModelConfig fields "
                          f"(e.g. num_hidden_layers: 2)")
    from jaxmoe.train.args import TrainConfig
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; run `python -m jaxmoe.train --help` for the flags")
    if small:
        raw.update(SMALL)
        overrides = {}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    try:
        t = parse_args(["--config", f.name] + list(flags or []))
    finally:
        os.unlink(f.name)
    if force:
        t = dataclasses.replace(t, **force).validate()
    c, _, _, _ = resolve_model(t)
    if overrides:
        c = c.replace(**overrides).validate(f"{path}: model_overrides")
    return t, c


def run_cli(compute, show, args, flags) -> int:
    """Shared `main` of the bench scripts: compute the result, print it, write --json; exit 2 on bad input."""
    import json
    import sys

    from jaxmoe.config import ConfigError
    try:
        r = compute(args, flags)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
