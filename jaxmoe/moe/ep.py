"""Expert parallelism: token dispatch to the device of the expert-parallel group that owns each expert
(jax.shard_map).

Every token-splitting axis (data, expert, sequence, tensor) gives each device its own tokens inside the
MoE layer; experts are split over the expert-parallel group `ep_axes`: `expert`, plus the tensor / sequence
ranks folded into it (MoE parallel folding, mesh.MeshSpec.ep_axes). The layer runs Megatron-Core's phases
(moe_layer.py / token_dispatcher.py), each under jax.named_scope("moe/<phase>") so profiles and HLO op
metadata name them:
  route                (moe/router.py) top-k experts and weights of each token
  dispatch_preprocess  drop copies over capacity, pack each peer's token copies into a fixed-size buffer
  dispatch             exchange the buffers over the group (all-to-all)
  experts              the local experts on the received rows (one grouped matmul)
  combine              send the results back (all-to-all)
  postprocess          unpack and sum the copies with the routing weights
Transports:
  all_to_all  dense `all_to_all` of padded per-peer buffers (compiles everywhere, the CPU-tested path)
  ragged      `jax.lax.ragged_all_to_all` moving only real rows (GPU; XLA:CPU cannot compile it)
Per-peer buffer rows, of the n*k token copies a device routes:
  capacity factor cf   each expert keeps at most ceil(n*k / E * cf) copies per device (Megatron's drop policies
                       `probs`: highest routing weight first, or `position`: first tokens first); dropped copies
                       contribute zero and are counted (stat `dropped`).
  dropless, bound F    ceil(F * n*k / ep) rows; copies past it are counted (stat `overflow`) and the train step
                       is not applied (train/step.py); the trainer re-runs it with the worst-case buffer.
  dropless, no bound   n*k (the worst case: every copy to one peer).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmoe.moe.experts import expert_ffn
from jaxmoe.sharding import shard_map_rest

STATS = ("dropped", "overflow")  # per-step token-copy counts a dispatch can report (summed over layers)


def phase(name: str):
    """Decorator: run the function under jax.named_scope("moe/<name>") (a label in profiles / HLO metadata)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with jax.named_scope(f"moe/{name}"):
                return fn(*args, **kwargs)
        return run
    return wrap


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static settings of one expert-parallel dispatch."""
    transport: str  # all_to_all | ragged
    ep_axes: tuple[str, ...]
    token_axes: tuple[str, ...]  # every mesh axis splitting the tokens
    etp_axis: str | None = None
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    buffer_factor: float | None = None  # dropless: per-peer rows = ceil(F * copies / ep)

    def buffer_rows(self, copies: int, num_experts: int, ep: int) -> tuple[int, int | None]:
        """(rows of each per-peer buffer, per-expert capacity or None) for `copies` local token copies."""
        local = num_experts // ep
        if self.capacity_factor is not None:
            per_expert = max(1, math.ceil(copies / num_experts * self.capacity_factor))  # Megatron get_capacity
            return min(copies, per_expert * local), per_expert
        if self.buffer_factor is not None:
            return min(copies, math.ceil(self.buffer_factor * copies / ep)), None
        return copies, None

    @property
    def reported(self) -> tuple[str, ...]:
        """The STATS this dispatch reports."""
        if self.capacity_factor is not None:
            return ("dropped",)
        return ("overflow",) if self.buffer_factor is not None else ()


class Packed(NamedTuple):
    """Where each token copy went (sorted order): what postprocess needs to unpack the results."""
    order: jax.Array  # [n*k] copy index of each sorted slot
    peer: jax.Array  # [n*k] destination peer; ep for copies not sent
    pos: jax.Array  # [n*k] row in the peer's buffer
    sent: jax.Array  # [n*k] bool: the copy is in a buffer
    send_counts: jax.Array  # [ep] rows sent to each peer


def _keep_mask(flat_e, flat_w, num_experts: int, capacity: int, policy: str):
    """Per-expert capacity: True for the copies each expert keeps. (Group starts from a cumulative bincount:
    jnp.searchsorted does not trace inside the train step's manual shard_map region.)"""
    n = flat_e.shape[0]
    prio = -flat_w if policy == "probs" else jnp.arange(n, dtype=jnp.float32)
    order = jnp.lexsort((prio, flat_e))  # by expert, then priority
    e_sorted = flat_e[order]
    sizes = jnp.bincount(flat_e, length=num_experts)
    start = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(n) - start[e_sorted]
    rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    return rank < capacity


@phase("dispatch_preprocess")
def _gather_tensor_ranks(arrays, etp_axis):
    """Expert tensor parallelism: the tensor ranks share their tokens (each holds 1/etp of every FFN)."""
    return tuple(jax.lax.all_gather(a, etp_axis, axis=1, tiled=True) for a in arrays)


@phase("dispatch_preprocess")
def _dispatch_preprocess(x, idx, w, local_experts: int, ep: int, plan: Plan, send):
    """Token copies x [n, H] (idx, w [n, k]) -> per-peer buffers [ep, cap, H] of rows and [ep, cap] of their
    local expert (local_experts = empty row), the packing, and the counts (dropped, overflow) [2] int32.
    Copies are sorted by global expert (dropped ones last), so each peer's experts are contiguous. `send`
    False: no copy is sent (nor counted as dropped)."""
    (n, k), H = idx.shape, x.shape[1]
    E = local_experts * ep
    cap, per_expert = plan.buffer_rows(n * k, E, ep)
    flat_e = idx.reshape(-1)
    fits = (jnp.ones_like(flat_e, bool) if per_expert is None
            else _keep_mask(flat_e, w.reshape(-1), E, per_expert, plan.drop_policy))
    keep = fits & send
    order = jnp.argsort(jnp.where(keep, flat_e, E), stable=True)
    e_sorted = jnp.where(keep, flat_e, E)[order]
    kept = e_sorted < E
    peer = jnp.minimum(e_sorted // local_experts, ep - 1)
    counts = jnp.bincount(jnp.where(kept, peer, ep), length=ep + 1)[:ep].astype(jnp.int32)
    pos = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[peer]
    sent = kept & (pos < cap)  # a bounded dropless buffer can overflow: those copies are counted, not sent
    tgt = jnp.where(sent, peer, ep)  # out of bounds: the scatter drops the copy
    rows = jnp.take(x, order // k, axis=0)
    buf = jnp.zeros((ep, cap, H), x.dtype).at[tgt, pos].set(rows, mode="drop")
    ebuf = jnp.full((ep, cap), local_experts, jnp.int32).at[tgt, pos].set(
        (e_sorted % local_experts).astype(jnp.int32), mode="drop")
    stats = jnp.stack([jnp.sum(~fits & send), jnp.sum(jnp.maximum(counts - cap, 0))]).astype(jnp.int32)
    return buf, ebuf, Packed(order, tgt, pos, sent, jnp.minimum(counts, cap)), stats


@phase("dispatch")
def _dispatch(buf, ebuf, send_counts, plan: Plan):
    """Megatron's token_dispatch: each peer gets its buffer (and the rows' local experts)."""
    ep, cap, H = buf.shape
    if plan.transport == "ragged":
        recv = _ragged_exchange(buf.reshape(ep * cap, H), send_counts, cap, plan.ep_axes).reshape(ep, cap, H)
    else:
        recv = jax.lax.all_to_all(buf, plan.ep_axes, 0, 0, tiled=True)
    return recv, jax.lax.all_to_all(ebuf, plan.ep_axes, 0, 0, tiled=True)


@phase("experts")
def _experts(recv, recv_e, wi, wo, lora, gmm, dt):
    """The local experts on the received rows [ep, cap, H]; empty rows sort last, outside every group, -> 0."""
    ep, cap, H = recv.shape
    E_l = wi.shape[0]
    re = recv_e.reshape(-1)
    order = jnp.argsort(re, stable=True)
    group_sizes = jnp.bincount(re, length=E_l + 1)[:E_l].astype(jnp.int32)
    ys = expert_ffn(jnp.take(recv.reshape(ep * cap, H), order, axis=0), wi, wo, group_sizes, gmm, dt, lora)
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(ep, cap, H)
    return jnp.where((recv_e < E_l)[..., None], ys, 0)


@phase("combine")
def _combine(ys, send_counts, plan: Plan):
    """Megatron's token_combine: the results go back to the devices that sent the rows."""
    ep, cap, H = ys.shape
    if plan.transport == "ragged":
        back = _ragged_exchange(ys.reshape(ep * cap, H), _recv_counts(send_counts, plan.ep_axes), cap, plan.ep_axes)
        return back.reshape(ep, cap, H)
    return jax.lax.all_to_all(ys, plan.ep_axes, 0, 0, tiled=True)


@phase("postprocess")
def _combine_postprocess(back, packed: Packed, w, shape, plan: Plan):
    """Unpack the results [ep, cap, H] to the token copies and sum them with the routing weights w [n, k]
    (fp32); under expert tensor parallelism reduce-scatter the partial fc2 sums back to each rank's tokens."""
    ep, cap, H = back.shape
    n, k = w.shape
    out = back[packed.peer.clip(0, ep - 1), packed.pos.clip(0, cap - 1)]
    out = jnp.where(packed.sent[:, None], out, 0)
    copies = jnp.zeros((n * k, H), out.dtype).at[packed.order].set(out)
    y = jnp.einsum("nkh,nk->nh", copies.reshape(n, k, H).astype(jnp.float32), w).reshape(shape)
    if plan.etp_axis:
        y = jax.lax.psum_scatter(y, plan.etp_axis, scatter_dimension=1, tiled=True)
    return y


def _own_dropout_key(lora, token_axes):
    """Each device draws its own LoRA-dropout mask (its tokens differ)."""
    if lora is None or "_key" not in lora:
        return lora
    key = lora["_key"]
    for a in token_axes:
        key = jax.random.fold_in(key, jax.lax.axis_index(a))
    return {**lora, "_key": key}


def _local_dispatch(x, idx, w, wi, wo, lora, send, *, gmm, dt, plan: Plan):
    """One device's MoE layer after routing: x [b, t, H], idx / w [b, t, k] -> (y [b, t, H] in dt, the
    counts (dropped, overflow) as [1, 2] int32, counted once per token)."""
    if plan.etp_axis:
        x, idx, w = _gather_tensor_ranks((x, idx, w), plan.etp_axis)
    shape = x.shape
    x, idx, w = x.reshape(-1, shape[-1]), idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])
    lora = _own_dropout_key(lora, plan.token_axes)
    buf, ebuf, packed, stats = _dispatch_preprocess(x, idx, w, wi.shape[0], jax.lax.axis_size(plan.ep_axes), plan,
                                                    send)
    recv, recv_e = _dispatch(buf, ebuf, packed.send_counts, plan)
    ys = _experts(recv, recv_e, wi, wo, lora, gmm, dt)
    back = _combine(ys, packed.send_counts, plan)
    y = _combine_postprocess(back, packed, w, shape, plan)
    if plan.etp_axis:  # the tensor ranks dispatched the same gathered tokens: count them once
        stats = jnp.where(jax.lax.axis_index(plan.etp_axis) == 0, stats, 0)
    return y.astype(dt), stats[None]


def _recv_counts(send_counts, axes):
    """How many rows each peer of the group `axes` sent me (the transpose of everyone's send counts)."""
    return jax.lax.all_to_all(send_counts[:, None], axes, 0, 0, tiled=True)[:, 0]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ragged_exchange(operand, send_counts, cap, axes):
    """Move only the real rows over the group `axes`: chunk i of `operand` (rows [i*cap, i*cap +
    send_counts[i])) lands at offset my_rank*cap of peer i's output. Output buffers are zero-initialised
    (unwritten rows stay 0). Differentiable and batchable (the pipeline vmaps the MoE dispatch over stages)."""
    return _batchable_exchange(operand, send_counts, cap, axes)


def _exchange_fwd(operand, send_counts, cap, axes):
    return _batchable_exchange(operand, send_counts, cap, axes), _recv_counts(send_counts, axes)


def _exchange_bwd(cap, axes, recv_counts, ct):
    # The exchange is a permutation of rows with the same offset pattern both ways (chunk i at i*cap is sent
    # to offset me*cap of peer i): its transpose sends the received rows back with the counts swapped.
    return _batchable_exchange(ct, recv_counts, cap, axes), None


_ragged_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _ragged_a2a(operand, send_counts, cap, axes):
    """Peers are numbered as all_to_all and the experts' sharding number them: row-major over `axes`."""
    ep = send_counts.shape[0]
    me = jax.lax.axis_index(axes)
    input_offsets = (jnp.arange(ep) * cap).astype(jnp.int32)
    output_offsets = jnp.full((ep,), me * cap, jnp.int32)
    recv_sizes = _recv_counts(send_counts, axes)
    out = jnp.zeros_like(operand)
    return jax.lax.ragged_all_to_all(operand, out, input_offsets, send_counts, output_offsets, recv_sizes,
                                     axis_name=axes)


def _batchable_exchange(operand, send_counts, cap, axes):
    """ragged_all_to_all has no batching rule (jax 0.10: an AssertionError under vmap). Under the pipeline's
    vmap over stages each device holds one stage's slice, so a batch is unstacked and exchanged slice by slice
    (one slice per device in practice)."""
    @jax.custom_batching.custom_vmap
    def f(x, counts):
        return _ragged_a2a(x, counts, cap, axes)

    @f.def_vmap
    def rule(axis_size, in_batched, x, counts):
        x, counts = (a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                     for a, b in zip((x, counts), in_batched))
        return jnp.stack([f(x[i], counts[i]) for i in range(axis_size)]), True

    return f(operand, send_counts)


def make_ep_dispatch(mesh, transport: str = "auto", capacity_factor: float | None = None,
                     drop_policy: str = "probs", ep_axes: tuple[str, ...] = ("expert",), etp: int = 1,
                     buffer_factor: float | None = None, pad_to_capacity: bool = False):
    """A `dispatch(x [B, T, H], idx, w [B, T, k], wi, wo, opts) -> (y, stats)` for moe_mlp that runs the experts
    expert-parallel over `mesh`. `ep_axes`: the expert-parallel group (MeshSpec.ep_axes; folded tensor /
    sequence ranks included), over which the experts are split and the tokens exchanged. `etp` > 1: each
    expert's FFN is split over `tensor` (Megatron's expert tensor parallelism, etp = tp): the tensor ranks gather
    their tokens, dispatch them together and reduce-scatter the partial outputs. `buffer_factor` bounds the
    dropless per-peer buffer (module doc); `pad_to_capacity` exchanges whole capacity-padded buffers (the
    all_to_all transport). `stats`: the `dispatch.stats` counts of the whole micro-batch (int32 scalars).
    `dispatch.worst_case()` is the same dispatch without the dropless bound."""
    platform = mesh.devices.flat[0].platform  # the target's, not the running backend's (jaxmoe.aot)
    if transport == "auto":
        transport = "ragged" if platform == "gpu" and not pad_to_capacity else "all_to_all"  # padded: moved whole
    if transport not in ("all_to_all", "ragged"):
        raise ValueError(f"--moe_transport {transport!r}: choose auto, all_to_all or ragged")
    if transport == "ragged" and platform == "cpu":
        raise ValueError("--moe_transport ragged needs a GPU (XLA:CPU cannot compile ragged_all_to_all); "
                         "use all_to_all")
    if transport == "ragged" and pad_to_capacity:
        raise ValueError("--moe_pad_expert_input_to_capacity exchanges whole padded buffers: use --moe_transport "
                         "all_to_all (or auto), not ragged")
    # tokens [B, T, ...]: rows over data/expert, positions over sequence/tensor (a dim never mixes axes that
    # are manual in the train step with ones that are not). Tokens always vary over expert.
    rows = tuple(a for a in ("data", "expert") if mesh.shape[a] > 1 or a == "expert")
    cols = tuple(a for a in ("sequence", "tensor") if mesh.shape[a] > 1)
    tok = P(rows, cols or None)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    bound = buffer_factor if capacity_factor is None and buffer_factor is not None and buffer_factor < ep else None
    plan = Plan(transport, tuple(ep_axes), rows + cols, "tensor" if etp > 1 else None, capacity_factor,
                drop_policy, bound)  # a factor >= ep is the worst case: nothing to bound, nothing to re-run
    wspec = P(tuple(ep_axes))
    wi_spec, wo_spec = ((P(tuple(ep_axes), None, None, "tensor"), P(tuple(ep_axes), "tensor")) if plan.etp_axis
                        else (wspec, wspec))

    def dispatch(x, idx, w, wi, wo, opts, lora=None, send=True):
        """`lora`: routed-expert LoRA adapters (A/B stacked on the expert axis, split with the experts).
        `send` (bool scalar): False sends no token (its output is not used: moe_mlp)."""
        from jaxmoe.model.layers import ops_for
        fn = partial(_local_dispatch, gmm=ops_for(opts).gmm, dt=opts.dtype, plan=plan)
        lspec = None if lora is None else {k: (P() if k.startswith("_") else jax.tree.map(lambda _: wspec, v))
                                           for k, v in lora.items()}
        if lora is not None and plan.etp_axis:
            raise ValueError("LoRA adapters of routed experts need --expert_tensor_parallel_size 1")
        y, st = shard_map_rest(fn, mesh, (tok, tok, tok, wi_spec, wo_spec, lspec, P()), (tok, P(plan.token_axes)),
                               opts.sharding.replicas)(x, idx, w, wi, wo, lora, jnp.asarray(send, bool))
        st = st.sum(0)  # over the devices (a no-op in the manual region: moe_mlp sums over those axes)
        return y, {k: st[STATS.index(k)] for k in plan.reported}

    dispatch.transport = transport
    dispatch.stats = plan.reported
    dispatch.bounded = plan.buffer_factor is not None
    dispatch.buffer_factor = plan.capacity_factor or plan.buffer_factor  # buffer rows / rows sent (None: ep)
    dispatch.buffer_rows = plan.buffer_rows
    dispatch.worst_case = lambda: make_ep_dispatch(mesh, transport, capacity_factor, drop_policy, ep_axes, etp,
                                                   None, pad_to_capacity)
    return dispatch
