"""Expert parallelism: token dispatch to the device of the expert-parallel group that owns each expert
(jax.shard_map).

Every token-splitting axis (data, expert, sequence, tensor) gives each device its own tokens inside the
MoE layer; experts are split over the expert-parallel group `ep_axes`: `expert`, plus the tensor / sequence
ranks folded into it (MoE parallel folding, mesh.MeshSpec.ep_axes). Each device routes its tokens, packs the
token copies for each peer of the group into a fixed-capacity buffer, exchanges buffers (all-to-all over the
group's axes), runs its local experts with one grouped matmul over the received rows, and sends the results
back to be combined with the routing weights. Transports:
  all_to_all  dense `all_to_all` of padded per-peer buffers (compiles everywhere, the CPU-tested path)
  ragged      `jax.lax.ragged_all_to_all` moving only real rows (GPU; XLA:CPU cannot compile it)
Dropless by default: the per-peer capacity is the worst case (every local copy to one peer). With a capacity
factor, each expert keeps at most ceil(cf * copies / E) copies per device (Megatron's drop policies `probs`:
highest routing weight first, or `position`: first tokens first) and dropped copies contribute zero.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmoe.moe.experts import expert_ffn
from jaxmoe.sharding import shard_map_rest



def _keep_mask(flat_e, flat_w, num_experts: int, capacity: int, policy: str):
    """Per-expert capacity: True for the copies each expert keeps."""
    n = flat_e.shape[0]
    prio = -flat_w if policy == "probs" else jnp.arange(n, dtype=jnp.float32)
    order = jnp.lexsort((prio, flat_e))  # by expert, then priority
    e_sorted = flat_e[order]
    start = jnp.searchsorted(e_sorted, jnp.arange(num_experts), side="left")
    rank_sorted = jnp.arange(n) - start[e_sorted]
    rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    return rank < capacity


def _local_dispatch(x, idx, w, wi, wo, lora, *, gmm, dt, transport: str, capacity_factor, drop_policy: str,
                    token_axes=(), ep_axes=("expert",), etp_axis=None):
    if etp_axis:  # expert tensor parallel: the group's ranks share their tokens, each holds 1/etp of every FFN
        x, idx, w = (jax.lax.all_gather(a, etp_axis, axis=1, tiled=True) for a in (x, idx, w))
    shape = x.shape  # [b, t, H] this device's tokens
    x, idx, w = x.reshape(-1, shape[-1]), idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])
    n, k = idx.shape
    if lora is not None and "_key" in lora:  # each device draws its own LoRA-dropout mask
        key = lora["_key"]
        for a in token_axes:
            key = jax.random.fold_in(key, jax.lax.axis_index(a))
        lora = {**lora, "_key": key}
    H = x.shape[1]
    E_l = wi.shape[0]
    ep = jax.lax.axis_size(ep_axes)
    E = E_l * ep
    flat_e = idx.reshape(-1)
    flat_w = w.reshape(-1)
    keep = jnp.ones_like(flat_e, bool)
    cap = n * k  # dropless worst case: every local copy goes to one peer
    if capacity_factor is not None:
        per_expert = max(1, math.ceil(capacity_factor * n * k / E))
        keep = _keep_mask(flat_e, flat_w, E, per_expert, drop_policy)
        cap = min(cap, per_expert * E_l)
    # Sort copies by global expert; dropped copies go last. Experts are contiguous per peer.
    key = jnp.where(keep, flat_e, E)
    order = jnp.argsort(key, stable=True)
    e_sorted = key[order]
    peer = jnp.minimum(e_sorted // E_l, ep - 1)
    valid = e_sorted < E
    send_counts = jnp.bincount(jnp.where(valid, peer, ep), length=ep + 1)[:ep].astype(jnp.int32)
    start = jnp.cumsum(send_counts) - send_counts
    pos = jnp.arange(n * k) - start[peer]
    rows = jnp.take(x, order // k, axis=0)
    local_e = jnp.where(valid, e_sorted % E_l, E_l).astype(jnp.int32)
    # [ep, cap, ...] buffers; invalid copies are written out of bounds and dropped.
    tgt_peer = jnp.where(valid, peer, ep)
    buf = jnp.zeros((ep, cap, H), x.dtype).at[tgt_peer, pos].set(rows, mode="drop")
    ebuf = jnp.full((ep, cap), E_l, jnp.int32).at[tgt_peer, pos].set(local_e, mode="drop")

    if transport == "ragged":
        recv = _ragged_exchange(buf.reshape(ep * cap, H), send_counts, cap).reshape(ep, cap, H)
    else:
        recv = jax.lax.all_to_all(buf, ep_axes, 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(ebuf, ep_axes, 0, 0, tiled=True)

    # Local experts on the received rows (rows of invalid slots sort last and are outside every group).
    flat_recv = recv.reshape(ep * cap, H)
    re = recv_e.reshape(-1)
    order2 = jnp.argsort(re, stable=True)
    group_sizes = jnp.bincount(re, length=E_l + 1)[:E_l].astype(jnp.int32)
    ys = expert_ffn(jnp.take(flat_recv, order2, axis=0), wi, wo, group_sizes, gmm, dt, lora)
    ys = jnp.zeros_like(ys).at[order2].set(ys).reshape(ep, cap, H)
    ys = jnp.where((recv_e < E_l)[..., None], ys, 0)

    if transport == "ragged":
        back = _ragged_exchange(ys.reshape(ep * cap, H), _recv_counts(send_counts), cap).reshape(ep, cap, H)
    else:
        back = jax.lax.all_to_all(ys, ep_axes, 0, 0, tiled=True)
    out_sorted = back[tgt_peer.clip(0, ep - 1), pos.clip(0, cap - 1)]
    out_sorted = jnp.where(valid[:, None], out_sorted, 0)
    copies = jnp.zeros((n * k, H), out_sorted.dtype).at[order].set(out_sorted)
    y = jnp.einsum("nkh,nk->nh", copies.reshape(n, k, H).astype(jnp.float32), w).reshape(shape)
    if etp_axis:  # partial sums of the row-parallel fc2 -> summed, each rank keeping its own tokens
        y = jax.lax.psum_scatter(y, etp_axis, scatter_dimension=1, tiled=True)
    return y.astype(dt)


def _recv_counts(send_counts):
    """How many rows each peer sent me (the transpose of everyone's send counts)."""
    return jax.lax.all_to_all(send_counts[:, None], "expert", 0, 0, tiled=True)[:, 0]


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ragged_exchange(operand, send_counts, cap):
    """Move only the real rows: chunk i of `operand` (rows [i*cap, i*cap + send_counts[i])) lands at
    offset my_rank*cap of peer i's output. Output buffers are zero-initialised (unwritten rows stay 0).
    Differentiable and batchable (the pipeline vmaps the MoE dispatch over stages)."""
    return _batchable_exchange(operand, send_counts, cap)


def _exchange_fwd(operand, send_counts, cap):
    return _batchable_exchange(operand, send_counts, cap), _recv_counts(send_counts)


def _exchange_bwd(cap, recv_counts, ct):
    # The exchange is a permutation of rows with the same offset pattern both ways (chunk i at i*cap is sent
    # to offset me*cap of peer i): its transpose sends the received rows back with the counts swapped.
    return _batchable_exchange(ct, recv_counts, cap), None


_ragged_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _ragged_a2a(operand, send_counts, cap):
    ep = send_counts.shape[0]
    me = jax.lax.axis_index("expert")
    input_offsets = (jnp.arange(ep) * cap).astype(jnp.int32)
    output_offsets = jnp.full((ep,), me * cap, jnp.int32)
    recv_sizes = _recv_counts(send_counts)
    out = jnp.zeros_like(operand)
    return jax.lax.ragged_all_to_all(operand, out, input_offsets, send_counts, output_offsets, recv_sizes,
                                     axis_name="expert")


def _batchable_exchange(operand, send_counts, cap):
    """ragged_all_to_all has no batching rule (jax 0.10: an AssertionError under vmap). Under the pipeline's
    vmap over stages each device holds one stage's slice, so a batch is unstacked and exchanged slice by slice
    (one slice per device in practice)."""
    @jax.custom_batching.custom_vmap
    def f(x, counts):
        return _ragged_a2a(x, counts, cap)

    @f.def_vmap
    def rule(axis_size, in_batched, x, counts):
        x, counts = (a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                     for a, b in zip((x, counts), in_batched))
        return jnp.stack([f(x[i], counts[i]) for i in range(axis_size)]), True

    return f(operand, send_counts)


def make_ep_dispatch(mesh, transport: str = "auto", capacity_factor: float | None = None,
                     drop_policy: str = "probs", ep_axes: tuple[str, ...] = ("expert",), etp: int = 1):
    """A `dispatch(x [B, T, H], idx, w [B, T, k], wi, wo, opts)` for moe_mlp that runs the experts expert-parallel
    over `mesh`. `ep_axes`: the expert-parallel group (MeshSpec.ep_axes; folded tensor / sequence ranks
    included), over which the experts are split and the tokens exchanged. `etp` > 1: each expert's FFN is
    split over `tensor` (Megatron's expert tensor parallelism, etp = tp): the tensor ranks gather their tokens,
    dispatch them together and reduce-scatter the partial outputs."""
    folded = tuple(ep_axes) != ("expert",)
    platform = mesh.devices.flat[0].platform  # the target's, not the running backend's (jaxmoe.aot)
    if transport == "auto":
        # the ragged exchange runs over `expert` only for now
        transport = "ragged" if platform == "gpu" and not folded else "all_to_all"
    if transport not in ("all_to_all", "ragged"):
        raise ValueError(f"--moe_transport {transport!r}: choose auto, all_to_all or ragged")
    if transport == "ragged" and folded:
        raise ValueError(f"--moe_transport ragged exchanges over the `expert` axis only; with the expert-parallel "
                         f"group folded over {list(ep_axes[1:])} use --moe_transport all_to_all (or auto)")
    if transport == "ragged" and platform == "cpu":
        raise ValueError("--moe_transport ragged needs a GPU (XLA:CPU cannot compile ragged_all_to_all); "
                         "use all_to_all")
    # tokens [B, T, ...]: rows over data/expert, positions over sequence/tensor (a dim never mixes axes that
    # are manual in the train step with ones that are not). Tokens always vary over expert.
    rows = tuple(a for a in ("data", "expert") if mesh.shape[a] > 1 or a == "expert")
    cols = tuple(a for a in ("sequence", "tensor") if mesh.shape[a] > 1)
    axes = rows + cols
    tok = P(rows, cols or None)
    wspec = P(tuple(ep_axes))
    etp_axis = "tensor" if etp > 1 else None
    wi_spec, wo_spec = (P(tuple(ep_axes), None, None, etp_axis), P(tuple(ep_axes), etp_axis)) if etp_axis else \
        (wspec, wspec)

    def dispatch(x, idx, w, wi, wo, opts, lora=None):
        """`lora`: routed-expert LoRA adapters (A/B stacked on the expert axis, split with the experts)."""
        from jaxmoe.model.layers import ops_for
        fn = partial(_local_dispatch, gmm=ops_for(opts).gmm, dt=opts.dtype, transport=transport,
                     capacity_factor=capacity_factor if capacity_factor is not None else opts.moe_capacity_factor,
                     drop_policy=drop_policy, token_axes=axes, ep_axes=tuple(ep_axes), etp_axis=etp_axis)
        lspec = None if lora is None else {k: (P() if k.startswith("_") else jax.tree.map(lambda _: wspec, v))
                                           for k, v in lora.items()}
        if lora is not None and etp_axis:
            raise ValueError("LoRA adapters of routed experts need --expert_tensor_parallel_size 1")
        return shard_map_rest(fn, mesh, (tok, tok, tok, wi_spec, wo_spec, lspec), tok, opts.sharding.replicas)(
            x, idx, w, wi, wo, lora)

    dispatch.transport = transport
    return dispatch
