"""Run one train step on a mesh of fake CPU devices, for equivalence with the single-device reference."""
from __future__ import annotations


import jax
import numpy as np

from jaxmoe.model.params import init_params, init_state
from jaxmoe.parallel.setup import build_parallel
from jaxmoe.train.build import build_step, model_options
from jaxmoe.train.loop import initial_state as initial_state_of
from jaxmoe.train.loss import LossOptions
from jaxmoe.train.optimizer import lr_schedule, make_optimizer
from jaxmoe.train.step import StepConfig, StepHooks, make_train_step
from tests.train_utils import MICRO, packed_rows, train_config


def batch_rows(G=8, T=64):
    return packed_rows(T, n=G)


def run_steps(mesh: str, n_devices: int, num_micro: int, steps: int = 1, c=MICRO, rows=None, compiled=False, **kw):
    """-> (train_state on host, [metrics per step]) after `steps` steps; or the compiled step with compiled=True."""
    args = dict(mesh=mesh, global_batch_size=8, micro_batch_size=1, max_length=64, lr=1e-3, min_lr=1e-4,
                adam_eps=1e-4, lr_warmup_iters=0)
    t = train_config(**{**args, **kw})
    devices = jax.devices()[:n_devices]
    par = build_parallel(t, c, devices)
    opts = model_options(t, sharding=par.sharding)
    opt = make_optimizer(t, 10)
    lo = LossOptions(mtp_layers=c.num_nextn_predict_layers, aux_coeff=1e-2)
    ts = initial_state(par, opt, c)
    sc = StepConfig(lo, opt, lr_schedule(t, 10), num_micro, t.clip_grad, 1e-2)
    step = jax.jit(make_train_step(c, opts, sc, StepHooks.for_layout(par)))
    batch = par.put_batch(rows if rows is not None else batch_rows())
    if compiled:
        return step.lower(ts, batch).compile(), par
    ms = []
    for _ in range(steps):
        ts, m = step(ts, batch)
        ms.append(jax.device_get(m))
    return jax.device_get(par.to_checkpoint(ts, opt)), ms  # the canonical layout, as the reference's


def run_built(mesh: str, n_devices: int, c=MICRO, rows=None, **kw):
    """One step of the trainer's own step (train.build.build_step: full or partial training) on `mesh`;
    -> (trainable state on host, metrics)."""
    args = dict(mesh=mesh, global_batch_size=8, micro_batch_size=1, max_length=64, lr=1e-3, min_lr=1e-4,
                adam_eps=1e-3, lr_warmup_iters=0)
    t = train_config(**{**args, **kw})
    par = build_parallel(t, c, jax.devices()[:n_devices])
    built = build_step(t, c, par, 10)
    st = initial_state_of(built, None, lambda *_: None)  # the trainer's own init (train/loop.py)
    ts, m = built.step(st.ts, par.put_batch(rows if rows is not None else batch_rows()), st.frozen)
    return jax.device_get(built.to_checkpoint(ts)), jax.device_get(m)


def check_built_equivalence(mesh: str, n_devices: int, c=MICRO, ref=None, **kw):
    """run_built on `mesh` equals it on one device (loss terms 1e-5, expert load exactly, every trainable
    parameter 1e-5 relative). Returns the single-device result."""
    ts, m = run_built(mesh, n_devices, c, **kw)
    ref_ts, ref_m = ref if ref is not None else run_built("", 1, c, **kw)
    for key in ("lm_loss", "mtp_loss", "grad_norm", "aux_loss"):
        np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(m["expert_load"]), np.asarray(ref_m["expert_load"]))
    assert_states_close(ts, ref_ts)
    return ref_ts, ref_m


def initial_state(par, opt, c=MICRO):
    """The train state of full training from init_params(key 1), in par's layout."""
    params = jax.jit(lambda k: init_params(c, k), out_shardings=par.master_shardings)(jax.random.key(1))
    mstate = jax.device_put(init_state(c), par.replicated)
    return par.init_train_state(params, mstate, opt)


def assert_states_close(a, b, rtol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a["params"])[0], jax.tree.leaves(b["params"])):
        x, y = np.asarray(x), np.asarray(y)
        err = np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)
        assert err <= rtol, (jax.tree_util.keystr(path), err)
    np.testing.assert_array_equal(np.asarray(a["model_state"]["moe_bias"]), np.asarray(b["model_state"]["moe_bias"]))


# The pipeline model is 3x deeper than MICRO: Adam's first step, g / (|g| + eps), turns the fp32 rounding of
# small gradient entries (bias vectors) into update noise of ~ 1e-7 * max|g| / eps, 1.3e-5 at eps 1e-4 on
# tp=4; eps 1e-3 keeps what the comparison sees to the layout's own error.
PIPE_OPT = dict(adam_eps=1e-3)


def check_equivalence(mesh: str, n_devices: int, num_micro: int, c=MICRO, ref=None, common=None, metrics=False,
                      **kw):
    """One train step on `mesh` equals the single-device step: loss terms 1e-5, expert load exactly, every
    updated parameter 1e-5 relative, router bias exactly. `common`: flags of both runs, `kw`: of the mesh run.
    Returns the single-device result (reuse it), or with `metrics` the mesh run's metrics."""
    common = common or {}
    ts, ms = run_steps(mesh, n_devices, num_micro, c=c, **common, **kw)
    ref_ts, ref_ms = ref if ref is not None else run_steps("", 1, num_micro, c=c, **common)
    for key in ("lm_loss", "mtp_loss", "grad_norm", "aux_loss"):
        np.testing.assert_allclose(float(ms[0][key]), float(ref_ms[0][key]), rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ms[0]["expert_load"]), np.asarray(ref_ms[0]["expert_load"]))
    assert_states_close(ts, ref_ts)
    return ms if metrics else (ref_ts, ref_ms)


if __name__ == "__main__":  # python -m tests.parallel_utils MESH DEVICES NUM_MICRO [pipe]: for > 8 fake devices
    import sys

    from tests.train_utils import PIPE
    pipe = sys.argv[4:] == ["pipe"]
    check_equivalence(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), c=PIPE if pipe else MICRO,
                      common=PIPE_OPT if pipe else None)
    print("EQUIVALENT")
