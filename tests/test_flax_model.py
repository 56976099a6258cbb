"""The Flax NNX face of the model (jaxmoe/model/flax.py): logits equal transformers', its state is exactly the
trainer's params / model-state trees, split/merge and nnx.jit, partition specs from the logical-axis table."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxmoe
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.mesh import make_mesh, parse_mesh
from jaxmoe.model.flax import Glm4MoeForCausalLM, RouterBias, flax_rules
from jaxmoe.model.params import init_params, init_state, logical_axes
from jaxmoe.sharding import logical_rules, logical_to_spec
from tests.hf_ref import random_hf_model
from tests.train_utils import MICRO, micro_model_dir, train_config

CFG = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                  n_group=2, topk_group=1, use_qk_norm=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
                  attention_bias=True, rope_theta=10000.0).validate()


def _same(x, y) -> bool:
    return jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), x, y))


def _close(got, ref, tol=1e-5):
    got, ref = np.asarray(got), np.asarray(ref)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), np.abs(got - ref).max()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    m = random_hf_model(CFG, seed=5)
    d = str(tmp_path_factory.mktemp("hf") / "glm")
    m.save_pretrained(d)
    return d, m


def test_from_pretrained_logits_equal_transformers(hf, tmp_path):
    d, m = hf
    model = Glm4MoeForCausalLM.from_pretrained(d)
    assert isinstance(model, nnx.Module) and type(jaxmoe.load_pretrained(d)) is Glm4MoeForCausalLM
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        ref = m(torch.from_numpy(ids)).logits.numpy()
    _close(model(ids), ref)
    _close(nnx.jit(lambda mod, x: mod(x))(model, ids), ref)
    # packed rows: the second segment restarts its positions and sees nothing of the first
    seg = np.array([[1] * 5 + [2] * 6] * 2)
    pos = np.array([list(range(5)) + list(range(6))] * 2)
    with torch.no_grad():
        ref2 = m(torch.from_numpy(ids[:, 5:])).logits.numpy()
    _close(model(ids, positions=pos, segment_ids=seg)[:, 5:], ref2)
    # save_pretrained streams the module back out; reloading gives the same weights bit for bit
    again = Glm4MoeForCausalLM.from_pretrained(model.save_pretrained(str(tmp_path / "out")))
    assert _same(again.params, model.params)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 101\)"):
        model(np.array([[3, 101]]))


def test_state_is_the_trainers_tree_and_split_merge_round_trips():
    model = Glm4MoeForCausalLM(MICRO, rngs=nnx.Rngs(7))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = init_params(MICRO, nnx.Rngs(7).params())
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert _same(params, want)
    bias = nnx.to_pure_dict(nnx.state(model, RouterBias))
    assert jax.tree.structure(bias) == jax.tree.structure(init_state(MICRO))
    assert not isinstance(model.moe_bias, nnx.Param)  # the optimizer (wrt=nnx.Param) never sees it
    ids = np.arange(24).reshape(2, 12) % MICRO.vocab_size
    ref = model(ids)
    graphdef, ps, biases, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    assert jax.tree.leaves(rest) == []  # nothing outside the two kinds
    merged = nnx.merge(graphdef, ps, biases)
    assert merged.config == MICRO and jnp.array_equal(merged(ids), ref)
    # a bias update moves the logits (it is live state, not a constant of the graph)
    nnx.update(merged, nnx.map_state(lambda _, v: v + 0.5 * jnp.arange(v.shape[-1]), nnx.state(merged, RouterBias)))
    assert not jnp.allclose(merged(ids), ref)


def test_partition_specs_follow_the_logical_axis_table():
    model = Glm4MoeForCausalLM(MICRO, rngs=nnx.Rngs(0))
    axes = logical_axes(MICRO)
    params = nnx.state(model, nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    assert specs == jax.tree.map(lambda a: P(*a), axes, is_leaf=lambda x: isinstance(x, tuple))
    with nnx.logical_axis_rules(flax_rules()):
        mesh_specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    rules = logical_rules()
    assert mesh_specs == jax.tree.map(lambda a: logical_to_spec(a, rules), axes, is_leaf=lambda x: isinstance(x, tuple))
    assert mesh_specs["moe"]["experts_wi"] == P(None, "expert", None, None, None)
    assert mesh_specs["embed"] == P("tensor", None)
    # sharded over tp=2, ep=2 with those rules: same logits under nnx.jit
    mesh = make_mesh(parse_mesh("tp=2,ep=2", 4), jax.devices()[:4])
    ids = np.arange(24).reshape(2, 12) % MICRO.vocab_size
    ref = model(ids)
    state = nnx.state(model)
    with nnx.logical_axis_rules(flax_rules()):
        shardings = nnx.get_named_sharding(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    assert model.moe["experts_wi"][...].sharding.spec == P(None, "expert", None, None, None)
    _close(nnx.jit(lambda mod, x: mod(x))(model, ids), ref)


def _doc_block(heading: str) -> str:
    """The first ```python block after `heading` in docs/flax.md."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flax.md")).read()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_docs_training_loop_runs_and_loss_falls():
    ns = {}
    exec(compile(_doc_block("## Your own training loop"), "docs/flax.md", "exec"), ns)
    losses = ns["losses"]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1, losses


def test_train_checkpoint_into_the_module_and_back(tmp_path, capsys):
    from jaxmoe.train import checkpoint as ckpt
    from jaxmoe.train.__main__ import main
    from jaxmoe.train.loop import run
    kw = dict(model=micro_model_dir(tmp_path), global_batch_size=8, micro_batch_size=1)
    run(train_config(**kw, train_iters=2, save=str(tmp_path / "a")))
    model = Glm4MoeForCausalLM.from_train_checkpoint(str(tmp_path / "a"))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: {"params": init_params(MICRO, jax.random.key(0)), "model_state": init_state(MICRO)})
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)

    def weights(d):  # what the trainer's --finetune reads (jaxmoe/train/loop.py)
        return ckpt.restore(d, abstract, partial=True)[0]

    assert _same(weights(str(tmp_path / "a")), {"params": model.params, "model_state": model.state})
    assert float(jnp.abs(model.moe_bias[...]).sum()) > 0  # the trainer moved the router bias: it came along
    # back: a weights-only train checkpoint holding exactly those trees
    model.save_train_checkpoint(str(tmp_path / "mine"), step=5)
    assert _same(weights(str(tmp_path / "mine")), weights(str(tmp_path / "a")))
    assert ckpt.read_meta(str(tmp_path / "mine"))["iteration"] == 5
    assert main(["--load", str(tmp_path / "mine"), "--save", str(tmp_path / "c")]) == 2
    assert "weights-only checkpoint (no optimizer state); add --finetune" in capsys.readouterr().err
    # a LoRA run's checkpoint holds adapters only: one clear error pointing at merge-lora
    saver = ckpt.Checkpointer(str(tmp_path / "lora"), async_save=False)
    saver.save(1, {"lora": {"a": jnp.zeros(2)}}, None, {"partial": {"lora": {}}, "model_config": MICRO.to_hf_dict()})
    saver.close()
    with pytest.raises(ConfigError, match="merge-lora"):
        Glm4MoeForCausalLM.from_train_checkpoint(str(tmp_path / "lora"))
