"""LoRA: adapters off == base, merged == unmerged after training, only trainable params change and carry optimizer
state, mesh (tp=2, ep=2) == single device, PEFT export == transformers + peft, memory of the LoRA step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.config import ConfigError
from jaxmoe.lora import LoraConfig, attach, init_lora, merge_lora
from jaxmoe.lora.adapters import put_extras
from jaxmoe.lora.train import PartialTraining
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.params import init_params, init_state
from jaxmoe.model.transformer import default_batch, forward, lm_logits, logits_fn
from jaxmoe.parallel.setup import build_parallel
from jaxmoe.train.loss import LossOptions
from jaxmoe.train.optimizer import lr_schedule, make_optimizer
from jaxmoe.train.step import StepConfig, StepHooks, make_train_step
from tests.train_utils import MICRO, packed_rows, train_config

OPTS = ModelOptions()
ALL = ("all-linear", "eh_proj")
HF_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_experts", "experts")


@pytest.fixture(scope="module")
def base():
    return init_params(MICRO, jax.random.key(0)), init_state(MICRO)


def _ids(T=16):
    return jax.random.randint(jax.random.key(1), (2, T), 0, MICRO.vocab_size)


def _hidden(params, state, ids):
    b = default_batch(ids)
    b["labels"] = jnp.roll(ids, -1, axis=1)
    h, aux = forward(params, state, b, MICRO, OPTS)
    return np.asarray(lm_logits(params, h, OPTS)), np.asarray(aux["mtp_hidden"][0])


@pytest.mark.parametrize("targets", [ALL, HF_NAMES])
def test_zero_b_is_exactly_the_base(base, targets):
    params, state = base
    lc = LoraConfig(rank=4, alpha=8, target_modules=targets).validate()
    lora = init_lora(MICRO, lc, jax.random.key(2))
    ids = _ids()
    got, want = _hidden(attach(params, lora, lc), state, ids), _hidden(params, state, ids)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # and a random B really changes the logits (the adapters are wired in)
    lora = init_lora(MICRO, lc, jax.random.key(2), b_std=0.3)
    assert np.abs(_hidden(attach(params, lora, lc), state, ids)[0] - want[0]).max() > 1e-2


def test_bad_targets():
    with pytest.raises(ConfigError, match="router"):
        LoraConfig(target_modules=("router",)).validate()
    with pytest.raises(ConfigError, match="unknown"):
        LoraConfig(target_modules=("qkv_proj",)).validate()
    with pytest.raises(ConfigError, match="both"):
        LoraConfig(target_modules=("linear_qkv", "q_proj")).validate()


def _lora_train(t, params, state, steps=2, devices=None):
    """Run `steps` LoRA train steps through the trainer's own hooks; returns (ptrain, ts0, ts, frozen)."""
    par = build_parallel(t, MICRO, devices or jax.devices()[:1])
    pt = PartialTraining.from_train_config(t, MICRO)
    opt = make_optimizer(t, 10)
    frozen = jax.device_put(params, par.param_shardings)
    ts = pt.init_train_state(frozen, jax.device_put(state, par.replicated), opt, par)
    ts0 = jax.tree.map(np.asarray, ts)
    sc = StepConfig(LossOptions(mtp_layers=1), opt, lr_schedule(t, 10), 2, t.clip_grad, 0.0)
    opts = dataclasses.replace(OPTS, sharding=par.sharding)
    step = jax.jit(make_train_step(MICRO, opts, sc, StepHooks(**pt.make_hooks(par))))
    rows = packed_rows(64, n=4)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in rows.items()}, par.batch_sharding())
    for _ in range(steps):
        ts, m = step(ts, batch, frozen)
        assert bool(m["finite"])
    return pt, ts0, ts, frozen


def test_training_changes_only_adapters_and_merge_equals_unmerged(base):
    params, state = base
    t = train_config(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(ALL),
                     modules_to_save=["lm_head"], lr=1e-2)
    pt, ts0, ts, _ = _lora_train(t, params, state)
    # state holds only adapters + lm_head; optimizer moments only for them
    assert set(ts["params"]) == {"lora", "extra"} and set(ts["params"]["extra"]) == {"lm_head"}
    n_train = sum(x.size for x in jax.tree.leaves(ts["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(ts["opt_state"]) if x.ndim)
    assert n_opt == 2 * n_train
    assert all(np.any(np.asarray(a) != b) for a, b in zip(jax.tree.leaves(ts["params"]["lora"]),
                                                         jax.tree.leaves(ts0["params"]["lora"])))
    np.testing.assert_array_equal(np.asarray(ts["model_state"]["moe_bias"]), 0.0)  # router bias frozen
    lora, extras = ts["params"]["lora"], ts["params"]["extra"]
    merged = merge_lora(params, lora, pt.lc, extras)
    unmerged = attach(put_extras(params, extras), lora, pt.lc)
    ids = _ids()
    for got, want in zip(_hidden(merged, state, ids), _hidden(unmerged, state, ids)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the frozen base is untouched by merging: every non-target param equals the base
    assert np.array_equal(np.asarray(merged["embed"]), np.asarray(params["embed"]))
    assert np.array_equal(np.asarray(merged["moe"]["router"]), np.asarray(params["moe"]["router"]))


def test_mesh_tp2_ep2_equals_single_device(base):
    """LoRA forward and a LoRA train step with params / adapters sharded tp=2, ep=2 equal one device."""
    params, state = base
    t = train_config(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=["linear_qkv", "linear_proj", "shared_experts", "experts"], mesh="tp=2,ep=2")
    par = build_parallel(t, MICRO, jax.devices()[:4])
    lc = LoraConfig.from_train_config(t)
    lora = init_lora(MICRO, lc, jax.random.key(5), b_std=0.3)
    pt = PartialTraining.from_train_config(t, MICRO)
    sh_lora = pt.trainable_shardings(par)["lora"]
    ids = _ids()
    want = np.asarray(logits_fn(attach(params, lora, lc), state, ids, MICRO))
    opts = ModelOptions(sharding=par.sharding)
    fn = jax.jit(lambda p, l, s, x: logits_fn(attach(p, l, lc), s, x, MICRO, opts))
    got = fn(jax.device_put(params, par.param_shardings), jax.device_put(lora, sh_lora), state, ids)
    assert got.sharding.mesh.shape["tensor"] == 2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # routed-expert adapters: refused with a clear error while the EP dispatch cannot carry them
    if par.dispatch is not None:
        t2 = dataclasses.replace(t, target_modules=["experts"])
        import inspect
        if "lora" not in inspect.signature(par.dispatch).parameters:
            with pytest.raises(ConfigError, match="expert-parallel"):
                PartialTraining.from_train_config(t2, MICRO).make_hooks(par)
    # train steps on the mesh == on one device (routed-expert adapters ride through the EP dispatch)
    _, _, ts1, _ = _lora_train(dataclasses.replace(t, mesh=""), params, state, steps=2)
    _, _, ts4, _ = _lora_train(t, params, state, steps=2, devices=jax.devices()[:4])
    # Adam moves every element by ~lr (3e-3) per step whatever its gradient's size, so on an element whose
    # gradient is near zero float rounding of the sharded sums shows at ~1e-3 of that step: atol 1e-5.
    for a, b in zip(jax.tree.leaves(ts1["params"]), jax.tree.leaves(ts4["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-5)


def test_peft_export_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    from jaxmoe.convert.hf_params import params_from_hf
    from jaxmoe.convert.peft_export import export_peft
    from tests.hf_ref import disk_tensors, random_hf_model

    c0 = MICRO.replace(num_nextn_predict_layers=0)
    tensors = disk_tensors(random_hf_model(c0))
    params, state = params_from_hf(lambda k: tensors[k], c0)
    ids = np.random.RandomState(0).randint(0, c0.vocab_size, (2, 12))
    for i, targets in enumerate([("all-linear",), HF_NAMES]):
        lc = LoraConfig(rank=3, alpha=6, target_modules=targets, use_rslora=bool(i)).validate()
        lora = init_lora(c0, lc, jax.random.key(3), b_std=0.3)
        extras = {"lm_head": params["lm_head"] * 1.1}
        want = np.asarray(logits_fn(attach(put_extras(params, extras), lora, lc), state, ids, c0))
        out = export_peft(str(tmp_path / f"peft{i}"), lora, lc, c0, extras=extras)
        model = PeftModel.from_pretrained(random_hf_model(c0), out).eval()
        with torch.no_grad():
            got = model(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


def test_lora_step_memory_far_below_full():
    """Compiled per-device memory (arguments, temporaries) of a bf16 train step: LoRA vs full fine-tuning."""
    from jaxmoe.model.params import param_shapes
    c = MICRO.replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    mem = {}
    for tt in ("full", "lora"):
        t = train_config(train_type=tt, dtype="bfloat16", lora_rank=4, max_length=64, micro_batch_size=1,
                         global_batch_size=1)
        par = build_parallel(t, c, jax.devices()[:1])
        opt = make_optimizer(t, 10)
        batch = {k: jax.ShapeDtypeStruct((1, 64), jnp.int32) for k in
                 ("input_ids", "labels", "positions", "segment_ids", "loss_mask")}
        opts = ModelOptions(compute_dtype="bfloat16")
        if tt == "full":
            sc = StepConfig(LossOptions(mtp_layers=1), opt, lr_schedule(t, 10), 1, 1.0, 1e-3)
            step = make_train_step(c, opts, sc)
            ts = jax.eval_shape(lambda: __import__("jaxmoe.train.step", fromlist=["x"]).init_train_state(
                param_shapes(c), init_state(c), opt))
            args = (ts, batch)
        else:
            pt = PartialTraining.from_train_config(t, c)
            sc = StepConfig(LossOptions(mtp_layers=1), opt, lr_schedule(t, 10), 1, 1.0, 0.0)
            step = make_train_step(c, opts, sc, StepHooks(**pt.make_hooks(par)))
            frozen = param_shapes(c, jnp.bfloat16)
            ts = jax.eval_shape(lambda: __import__("jaxmoe.train.step", fromlist=["x"]).init_train_state(
                pt.trainable_abstract(), init_state(c), opt))
            args = (ts, batch, frozen)
        ma = jax.jit(step, donate_argnums=0).lower(*args).compile().memory_analysis()
        mem[tt] = (ma.argument_size_in_bytes, ma.temp_size_in_bytes)
    print("memory_analysis (argument, temp) bytes:", mem)
    # state + weights: fp32 master + 2 Adam moments (12 B/param) vs the bf16 base (2 B/param) + adapters
    assert mem["lora"][0] < 0.25 * mem["full"][0], mem
    # temporaries: no fp32 gradient accumulator for the base (XLA:CPU's dense ragged_dot lowering inflates both)
    assert sum(mem["lora"]) < 0.7 * sum(mem["full"]), mem
