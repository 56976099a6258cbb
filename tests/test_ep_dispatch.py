"""The expert-parallel dispatch (jaxmoe/moe/ep.py): named phases in the compiled step, capacity dropping against
a per-device reference, and the bounded dropless buffer whose overflowing steps the trainer re-runs exactly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.config import ConfigError
from jaxmoe.mesh import MeshSpec, make_mesh
from jaxmoe.model import reference_ops
from jaxmoe.model.options import ModelOptions
from jaxmoe.moe.ep import make_ep_dispatch
from jaxmoe.moe.experts import routed_experts
from jaxmoe.parallel.setup import build_parallel
from jaxmoe.train.build import build_step
from jaxmoe.train.loop import overflow_guarded
from tests.parallel_utils import PIPE_OPT, batch_rows, check_equivalence, initial_state
from tests.test_pipeline import reference as pipeline_reference
from tests.train_utils import MICRO, PIPE, train_config

PHASES = ["moe/route", "moe/dispatch_preprocess", "moe/dispatch/", "moe/experts", "moe/combine", "moe/postprocess",
          "/attention/", "/mlp/", "/optimizer/"]
EP4 = dict(mesh="ep=4", global_batch_size=8, micro_batch_size=1, max_length=64, lr_warmup_iters=0)


def _reference_keep(idx, w, num_experts, capacity, policy):
    """Megatron's per-expert capacity on one device's copies idx/w [n, k]: keep the `capacity` copies of each
    expert with the highest weight (probs) or the first tokens (position)."""
    flat_e, flat_w = idx.reshape(-1), w.reshape(-1)
    keep = np.zeros(flat_e.shape, bool)
    for e in range(num_experts):
        mine = np.flatnonzero(flat_e == e)
        if policy == "probs":
            mine = mine[np.argsort(-flat_w[mine], kind="stable")]
        keep[mine[:capacity]] = True
    return keep.reshape(idx.shape)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_per_device_like_megatron(policy):
    """ep=2, tokens split over the two devices: each device keeps ceil(n*k/E * cf) copies per expert of its own
    tokens; the output equals the single-device experts with the dropped copies' weights zeroed, and the
    dropped count is exact."""
    E, k, H, F, cf = 8, 2, 16, 8, 0.5
    mesh = make_mesh(MeshSpec(expert=2), jax.devices()[:2])
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (4, 8, H), jnp.float32)
    idx = jnp.argsort(jax.random.uniform(keys[1], (4, 8, E)), axis=-1)[..., :k].astype(jnp.int32)  # distinct
    w = jax.random.uniform(keys[2], (4, 8, k), jnp.float32, 0.1, 1.0)
    wi = 0.3 * jax.random.normal(keys[3], (E, H, 2, F), jnp.float32)
    wo = 0.3 * jax.random.normal(keys[4], (F, H), jnp.float32)[None].repeat(E, 0)
    dispatch = make_ep_dispatch(mesh, "all_to_all", cf, policy)
    y, stats = jax.jit(lambda *a: dispatch(*a, ModelOptions()))(x, idx, w, wi, wo)

    n = 2 * 8  # tokens per device: rows [2d, 2d + 2)
    capacity = int(np.ceil(n * k / E * cf))
    ys, dropped = [], 0
    for d in range(2):
        xi, ii, wd = (np.asarray(a[2 * d:2 * d + 2]).reshape(n, -1) for a in (x, idx, w))
        keep = _reference_keep(ii, wd, E, capacity, policy)
        dropped += int((~keep).sum())
        ys.append(routed_experts(jnp.asarray(xi), jnp.asarray(ii), jnp.asarray(wd * keep), wi, wo,
                                 reference_ops.gmm, jnp.float32).reshape(2, 8, H))
    assert dropped > 0 and int(stats["dropped"]) == dropped
    np.testing.assert_allclose(np.asarray(y), np.concatenate(ys), rtol=1e-5, atol=1e-6)
    # a call whose output is unused (pipeline bubble, empty layer slot) sends nothing and drops nothing
    y0, stats0 = jax.jit(lambda *a: dispatch(*a, ModelOptions(), send=False))(x, idx, w, wi, wo)
    assert not np.asarray(y0).any() and int(stats0["dropped"]) == 0


def test_pipeline_carries_the_dropped_count():
    """pp=2 x ep=2 with capacity factor E/k (every expert may keep all local copies): the pipelined step reports
    `moe_dropped` (0, from the live stage iterations and MTP) and equals the single-device step."""
    ms = check_equivalence("pp=2,ep=2", 4, 4, c=PIPE, ref=pipeline_reference(), common=PIPE_OPT,
                           moe_expert_capacity_factor=4.0, metrics=True)
    assert int(ms[0]["moe_dropped"]) == 0


@pytest.fixture(scope="module")
def bounded():
    """The ep=4 train step with per-peer buffers of F = 0.5 (an eighth of the worst case: always overflows)."""
    t = train_config(**EP4, moe_dispatch_buffer_factor=0.5)
    par = build_parallel(t, MICRO, jax.devices()[:4])
    return t, par, build_step(t, MICRO, par, 10)


def test_compiled_ep_step_names_every_phase(bounded):
    """Megatron's MoE phases, attention, dense MLP and the optimizer are named in the compiled HLO metadata."""
    _, par, built = bounded
    ts = initial_state(par, built.optimizer)
    text = built.step.lower(ts, par.put_batch(batch_rows())).compile().as_text()
    assert [p for p in PHASES if p not in text] == []


def test_overflowing_step_is_rerun_with_worst_case_buffers_exactly(bounded):
    """Steps whose bounded buffer overflows leave the state unchanged and are re-run with the worst-case
    buffers (compiled once, one warning): two steps equal the worst-case step's bit for bit."""
    t, par, built = bounded
    t_worst = dataclasses.replace(t, moe_dispatch_buffer_factor=None)
    worst = build_step(t_worst, MICRO, build_parallel(t_worst, MICRO, jax.devices()[:4]), 10)
    logs = []
    step = overflow_guarded(built, 10, logs.append)
    batch = par.put_batch(batch_rows())
    ts, ref = initial_state(par, built.optimizer), initial_state(par, built.optimizer)
    for _ in range(2):
        ts, m = step(ts, batch)
        ref, m_ref = worst.step(ref, batch)
        assert int(m["moe_overflow"]) > 0 and "moe_overflow" not in m_ref
        assert float(m["lm_loss"]) == float(m_ref["lm_loss"])
    for a, b in zip(jax.tree.leaves(jax.device_get(ts)), jax.tree.leaves(jax.device_get(ref))):
        np.testing.assert_array_equal(a, b)
    assert int(jax.device_get(ts["updates"])) == 2
    assert len(logs) == 1 and logs[0].startswith("warning:") and "--moe_dispatch_buffer_factor 0.5" in logs[0]


def test_bounded_buffer_rows():
    """Per-peer rows: ceil(F * copies / ep), never above the worst case (all copies); with a capacity factor
    (which bounds the buffer itself) the factor is not used."""
    mesh = make_mesh(MeshSpec(expert=4), jax.devices()[:4])
    assert make_ep_dispatch(mesh, buffer_factor=1.5).buffer_rows(1000, 8, 4) == (375, None)
    assert make_ep_dispatch(mesh, buffer_factor=3.9).buffer_rows(1000, 8, 4) == (975, None)
    assert not make_ep_dispatch(mesh, buffer_factor=4.0).bounded  # F >= ep: the worst case, no re-run needed
    assert make_ep_dispatch(mesh).buffer_rows(1000, 8, 4) == (1000, None)
    capped = make_ep_dispatch(mesh, capacity_factor=1.0, buffer_factor=1.5)
    assert capped.buffer_rows(1000, 8, 4) == (250, 125) and capped.stats == ("dropped",) and not capped.bounded


@pytest.mark.parametrize("kw,msg", [
    (dict(moe_pad_expert_input_to_capacity=True), "--moe_pad_expert_input_to_capacity: pads to the capacity"),
    (dict(moe_dispatch_buffer_factor=0.0), "--moe_dispatch_buffer_factor: must be a positive number, got 0.0"),
    (dict(moe_expert_capacity_factor=-1.0), "--moe_expert_capacity_factor: must be a positive number"),
])
def test_bad_moe_flags(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        train_config(**kw).validate()


def test_log_line_sums_the_interval_copy_counts():
    """The text line shows the dropped / overflowed token copies summed over the log interval."""
    import io

    from jaxmoe.train.logging import TrainLogger
    out = io.StringIO()
    log = TrainLogger(None, train_iters=4, log_interval=2, stream=out)
    for it, (dropped, over) in enumerate([(3, 0), (4, 5), (0, 0), (1, 0)], 1):
        log.log_train(it, dict(consumed_samples=8 * it, elapsed_ms=1.0, lr=1e-4, global_batch_size=8, lm_loss=2.0,
                               grad_norm=1.0, skipped_iters=0, nan_iters=0, tokens=100, tokens_per_sec=10.0,
                               num_devices=4, moe_dropped=np.int32(dropped), moe_overflow=over))
    log.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" dropped token copies: 7 | EP buffer overflow copies (steps re-run): 5 |")
    assert lines[1].endswith(" dropped token copies: 1 | EP buffer overflow copies (steps re-run): 0 |")
