"""Train-step numerics: packing, gradient accumulation, the router-bias update, NaN skipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmoe.model.options import ModelOptions
from jaxmoe.model.params import init_params, init_state
from jaxmoe.train.loss import LossOptions, micro_loss
from jaxmoe.train.optimizer import lr_schedule, make_optimizer
from jaxmoe.train.step import StepConfig, init_train_state, make_train_step
from tests.train_utils import MICRO, packed_rows, train_config

OPTS = ModelOptions()


@pytest.fixture(scope="module")
def model():
    return init_params(MICRO, jax.random.key(0)), init_state(MICRO)


def _unpack(row, T):
    """The samples of one packed row, each alone in its own padded row."""
    out = []
    for s in range(1, int(row["segment_ids"].max()) + 1):
        sel = row["segment_ids"] == s
        one = {k: np.zeros(T, v.dtype) for k, v in row.items()}
        n = int(sel.sum())
        for k, v in row.items():
            one[k][:n] = v[sel]
        out.append(one)
    return out


def test_packed_loss_equals_sum_of_samples(model):
    params, state = model
    rows = packed_rows(64, n=3)
    assert rows["segment_ids"].max(axis=1).min() >= 2  # several samples per row
    lo = LossOptions(mtp_layers=1)
    fn = jax.jit(lambda b: micro_loss(params, state, b, MICRO, lo, OPTS)[1])
    packed = fn({k: jnp.asarray(v) for k, v in rows.items()})
    singles = [s for i in range(3) for s in _unpack({k: v[i] for k, v in rows.items()}, 64)]
    alone = fn({k: jnp.asarray(np.stack([s[k] for s in singles])) for k in rows})
    for key in ("nll_sum", "mtp_nll_sum", "mtp_tokens"):
        np.testing.assert_allclose(float(packed[key]), float(alone[key]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(packed["moe_counts"]), np.asarray(alone["moe_counts"]))


def _step(num_micro, t=None, rate=1e-3, opt=None, aux=1e-3):
    t = t or train_config()
    opt = opt or make_optimizer(t, 10)
    step = make_train_step(MICRO, OPTS, StepConfig(LossOptions(mtp_layers=1, aux_coeff=aux), opt, lr_schedule(t, 10),
                                                   num_micro, t.clip_grad, rate))
    return opt, jax.jit(step)


def test_grad_accumulation_equals_one_big_micro_batch(model):
    """4 micro-batches of 1 row == 1 micro-batch of 4 rows: same loss, grad norm, and update. Plain SGD
    (lr 1) makes the update the clipped gradient itself; Adam would amplify float-rounding noise in
    near-zero gradient elements into sign flips. The aux loss is off: like Megatron's it is a per-micro-batch
    quantity, so it legitimately changes with the split."""
    params, state = model
    batch = {k: jnp.asarray(v) for k, v in packed_rows(64, n=4).items()}
    results = []
    for num_micro in (4, 1):
        opt, step = _step(num_micro, opt=optax.sgd(1.0), aux=0.0)
        results.append(step(init_train_state(params, state, opt), batch))
    (a, ma), (b, mb) = results
    np.testing.assert_allclose(float(ma["lm_loss"]), float(mb["lm_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["mtp_loss"]), float(mb["mtp_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    for x, y, p in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), jax.tree.leaves(params)):
        ux, uy = np.asarray(x) - np.asarray(p), np.asarray(y) - np.asarray(p)
        ulp = 2 * np.spacing(np.abs(np.asarray(p))).max()  # updates are read back through fp32 params
        assert np.abs(ux - uy).max() <= 1e-5 * np.abs(uy).max() + ulp
    np.testing.assert_array_equal(np.asarray(a["model_state"]["moe_bias"]), np.asarray(b["model_state"]["moe_bias"]))


def test_bias_update_moves_loads_toward_balance(model):
    params, state = model
    # A router that sends most tokens to expert 0: balancing has real work to do.
    params = jax.tree.map(lambda x: x, params)
    params["moe"]["router"] = params["moe"]["router"].at[..., 0].add(0.3)
    batch = {k: jnp.asarray(v) for k, v in packed_rows(64, n=4).items()}
    t = train_config(lr=0.0, min_lr=0.0)  # weights frozen: only the correction bias moves
    opt, step = _step(1, t, rate=0.002)
    ts = init_train_state(params, state, opt)
    imbalance = []
    for _ in range(40):
        ts, m = step(ts, batch)
        load = np.asarray(m["expert_load"])
        imbalance.append(float((load.max(-1) / load.mean(-1)).mean()))
    assert imbalance[0] > 2.0
    assert imbalance[-1] < 0.65 * imbalance[0], imbalance  # 256 tokens x 2 choices: ~1.3 is the sampling floor
    b = np.asarray(ts["model_state"]["moe_bias"])
    assert b[0, 0] < 0 and b[0, 0] == b.min()  # the overloaded expert's bias went down most


def test_nonfinite_step_is_skipped(model):
    params, state = model
    batch = {k: jnp.asarray(v) for k, v in packed_rows(64, n=4).items()}
    opt, step = _step(1)
    ts = init_train_state(params, state, opt)
    bad = jax.tree.map(lambda x: x, ts)
    bad["params"]["final_norm"] = bad["params"]["final_norm"].at[0].set(jnp.nan)
    before = jax.tree.map(np.asarray, bad)
    out, m = step(bad, batch)
    assert not bool(m["finite"]) and int(m["skipped_iters"]) == 1 and int(m["nan_in_a_row"]) == 1
    assert int(out["updates"]) == 0
    for x, y in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(out["opt_state"])):
        np.testing.assert_array_equal(x, np.asarray(y))
    np.testing.assert_array_equal(before["model_state"]["moe_bias"], np.asarray(out["model_state"]["moe_bias"]))
