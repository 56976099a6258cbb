"""CPU proxies of training efficiency, measured on the trainer's own step (jaxmoe.perf.TrainStep):
model FLOPs of the traced train step vs the analytic count, collective bytes of the compiled step on a small
mesh vs the analytic minimum of that mesh, and per-device memory vs the analytic state bytes."""
import jax
import numpy as np
import pytest

from jaxmoe import perf
from jaxmoe.config import get_preset
from jaxmoe.flops import traced_flops, train_flops_per_token
from tests.train_utils import train_config

# tiny's structure (dense first layer, grouped router, shared expert) with 1 MoE layer, no MTP: small HLO
C = get_preset("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
T = 64


def _step(mesh, n, **kw):
    args = dict(mesh=mesh, max_length=T, global_batch_size=4, micro_batch_size=1, dtype="float32")
    return perf.TrainStep(train_config(**{**args, **kw}), C, jax.devices()[:n])


@pytest.mark.parametrize("seq", [64, 256])
def test_traced_train_flops_vs_analytic(seq):
    """value_and_grad + optimizer of the real step, counted on its jaxpr (grouped matmuls at routed size),
    over 3x the analytic causal forward. The excess is the plain-jnp reference attention, which computes the
    full T x T score and PV matmuls with a mask instead of the causal half: exactly
    3 * 4 * head_dim * heads * (T - (T+1)/2) per token per layer (5.5% at T=64, 19% at T=256 on this
    attention-heavy model; the flash kernel skips masked blocks). Everything else must match to 0.5% (what is
    left: the routing-weight multiply of the expert outputs and the router's backward, not in the model)."""
    c = get_preset("tiny")  # with MTP: the MTP block is part of the analytic count
    ts = perf.TrainStep(train_config(mesh="", max_length=seq, global_batch_size=2, micro_batch_size=2,
                                     dtype="float32"), c, jax.devices()[:1])
    assert ts.opts.remat == "none"
    traced = traced_flops(ts.jitted, ts.abstract_state(), ts.abstract_batch())
    tokens = ts.tokens_per_step
    causal = train_flops_per_token(c, seq) * tokens
    dense_attn = train_flops_per_token(c, seq, causal=False) * tokens
    assert 1.0 <= traced / dense_attn <= 1.005, traced / dense_attn
    assert traced / causal <= dense_attn / causal + 0.005
    if seq == 64:
        assert traced / causal <= 1.15, traced / causal


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for mesh in ("dp=2", "ep=2"):  # 2 micro-batches each: the gradient loop must be counted twice
        ts = _step(mesh, 2)
        assert ts.num_micro == 2
        comp = ts.compile()
        out[mesh] = (ts, comp, perf.collective_bytes(comp.as_text()))
    return out


def test_hlo_parser_counts_loop_trips_and_groups():
    hlo = """HloModule m, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %g = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %ar = f32[8,16]{1,0} all-reduce(%g), channel_id=1, replica_groups=[2,2]<=[4], to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,16], b: bf16[4,16]) -> bf16[16,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = bf16[4,16]{1,0} parameter(1)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[8,16]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body
  %cp = bf16[4,16]{1,0} collective-permute(%b), channel_id=2, source_target_pairs={{0,1},{1,0},{2,2},{3,3}}
  ROOT %ag = bf16[16,16]{1,0} all-gather(%cp), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
}
"""
    r = perf.collective_bytes(hlo)
    assert r["unknown_trip_counts"] == []
    ar = r["all-reduce"]  # 512 B operand, group of 2, 5 trips (from the condition's constant)
    assert (ar["ops"], ar["executions"], ar["payload_bytes"], ar["wire_bytes"]) == (1, 5, 5 * 512, 5 * 512.0)
    ag = r["all-gather"]  # 128 B per device gathered from 4
    assert (ag["payload_bytes"], ag["wire_bytes"]) == (4 * 128, 3 * 128.0)
    cp = r["collective-permute"]  # 2 of 4 devices send to another device
    assert (cp["payload_bytes"], cp["wire_bytes"]) == (128, 64.0)
    with_trip = hlo.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
    assert perf.collective_bytes(with_trip)["all-reduce"]["executions"] == 7


def test_collective_bytes_vs_analytic_minimum(compiled):
    """Payload per device of the compiled step between the mesh's analytic minimum and the form the step asks
    for (perf.collective_model). Lower end: gradients summed once per step (without the embedding, whose
    gradient XLA scatters from gathered token cotangents) + the ZeRO parameter all-gather. Upper end: one
    gradient sum per micro-batch (grad_transform constrains each micro-batch's gradient; XLA may sink it out
    of the loop) + the gather, +10% and 64 KiB of scalar / index traffic (loss, token count, grad norm, expert
    counts, routing metadata). XLA:CPU has no reduce-scatter: it sums with all-reduce and slices (2x the wire
    bytes of a reduce-scatter, same payload). ep=2: the padded dropless all-to-all sends, per pass, a
    worst-case [ep, local copies, hidden] buffer (every copy could go to one peer) plus int32 expert ids:
    ep^2/(ep-1) = 4x the minimum for ep=2, which bounds it from above."""
    ts, _, r = compiled["dp=2"]
    m = perf.collective_model(ts.par, T, C.hidden_size, ts.num_micro, C, compute_bytes=4)
    assert m["grad_reduce"] > 0 and m["param_gather"] > 0 and m["expert"] == 0
    got = r["total"]["payload_bytes"]
    upper = m["grad_reduce_per_micro"] + m["param_gather"]
    assert m["total"] <= got <= 1.10 * upper + 65536, (got, m)
    assert m["param_gather"] <= r["all-gather"]["payload_bytes"] <= 1.10 * m["param_gather"] + 65536
    assert r["unknown_trip_counts"] == []

    ts, _, r = compiled["ep=2"]
    m = perf.collective_model(ts.par, T, C.hidden_size, ts.num_micro, C, compute_bytes=4)
    copies = T * C.num_experts_per_tok  # per device per micro-batch
    a2a = r["all-to-all"]["payload_bytes"]
    per_pass = 2 * copies * C.hidden_size * 4  # [ep=2, copies, hidden] fp32
    ids = 2 * copies * 4
    assert m["expert"] < a2a <= ts.num_micro * C.num_moe_layers * 4 * (per_pass + ids), (a2a, m)
    # expert weights are split over `expert`: only the other gradients are summed over it, and their ZeRO
    # shards (master split over `expert` too) gathered once
    rest = r["total"]["payload_bytes"] - a2a
    assert m["param_gather"] > 0
    assert m["grad_reduce"] + m["param_gather"] <= rest <= \
        1.10 * (m["grad_reduce_per_micro"] + m["param_gather"]) + 65536, (rest, m)


def test_memory_per_device_vs_analytic_state(compiled):
    """Arguments of the compiled step = the state shards (12 B/param under ZeRO) + the batch, to 1%; the
    whole plan (arguments + temporaries) holds at least the weight-sized buffers of the analytic model."""
    for mesh, (ts, comp, _) in compiled.items():
        ma = comp.memory_analysis()
        state = perf.state_bytes_per_device(ts.par)
        batch = sum(v.nbytes for v in ts.host_batch().values()) // 2  # half the rows per device
        assert state <= ma.argument_size_in_bytes <= 1.01 * state + batch + 4096, (mesh, ma, state)
        model = perf.step_memory_model(ts.par, compute_bytes=4)
        assert ma.argument_size_in_bytes + ma.temp_size_in_bytes >= model["total"], (mesh, ma, model)
    # ZeRO-1 over every replica axis: dp=2 splits the whole state in two, and so does ep=2 (the experts by EP,
    # the other weights' master copies and moments over `expert`)
    full = 12 * perf.param_count(compiled["dp=2"][0].par)
    for mesh in ("dp=2", "ep=2"):
        np.testing.assert_allclose(perf.state_bytes_per_device(compiled[mesh][0].par), full / 2, rtol=0.02)
