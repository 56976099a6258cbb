"""Pipeline parallelism (parallel/pipeline.py): the layer split (Megatron's first/last-stage flags), one train
step on pp meshes equal to the single-device step (loss, expert load, every updated parameter to 1e-5, router
bias exactly), and per-stage memory that grows with the micro-batch count only by the hidden states the
GPipe schedule keeps."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.mesh import MeshError
from jaxmoe.parallel.pipeline import PipelineLayout, split_layers
from jaxmoe.parallel.setup import build_parallel
from tests.parallel_utils import PIPE_OPT, check_built_equivalence, check_equivalence, run_steps
from tests.train_utils import MICRO, PIPE, train_config
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_layers_default_and_megatron_flags():
    assert split_layers(PIPE, 2).counts == (3, 2)  # 5 MoE layers (layer 0 is dense)
    assert split_layers(PIPE, 4).counts == (2, 1, 1, 1)
    # Megatron counts the dense layer on the first stage: 2 layers there = 1 dense + 1 MoE
    assert split_layers(PIPE, 4, first=2, last=2).counts == (1, 1, 1, 2)
    assert split_layers(PIPE, 2, first=3).counts == (2, 3)
    air = dataclasses.replace(PIPE, num_hidden_layers=46)  # GLM-4.5-Air: 1 dense + 45 MoE
    assert split_layers(air, 4, first=10, last=12).counts == (9, 12, 12, 12)


@pytest.mark.parametrize("pp,first,last,needle", [
    (8, None, None, "the model has 5 MoE layers (of 6), fewer than the 8 pipeline stages"),
    (4, 1, None, "the first stage needs the 1 dense layer(s) and at least one MoE layer"),
    (4, 2, 2, None),
    (4, 3, 2, "the other 2 stage(s) would get 1 layers, which must be a positive multiple of 2"),
    (2, 2, 2, "the 2 stages get 4 layers, the model has 6"),
    (3, None, 4, "the other 2 stage(s) would get 1 layers"),
])
def test_split_layers_errors(pp, first, last, needle):
    if needle is None:
        split_layers(PIPE, pp, first, last)
        return
    with pytest.raises(MeshError) as e:
        split_layers(PIPE, pp, first, last)
    assert needle in str(e.value)


def test_layout_round_trip():
    lay = PipelineLayout((2, 1, 3))
    x = jnp.arange(6 * 2.0).reshape(6, 2)
    staged = lay.to_stages(x)
    assert staged.shape == (3, 3, 2)
    np.testing.assert_array_equal(lay.valid(), [[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(staged[1, 1:], 0)  # padding slots
    np.testing.assert_array_equal(lay.from_stages(staged), x)


@pytest.mark.parametrize("c,kw,n,needle", [
    (PIPE, dict(mesh="ep=2", decoder_first_pipeline_num_layers=2), 2, "need pipeline stages: add pp=N to --mesh"),
    (MICRO, dict(mesh="pp=2"), 2, "the model has 1 MoE layers (of 2), fewer than the 2 pipeline stages"),
    (PIPE, dict(mesh="pp=3"), 3, "vocab_size 1024 is not divisible by tp x pp = 3: the pipeline splits the embedding"),
])
def test_invalid_pipeline_flags(c, kw, n, needle):
    import jax
    t = train_config(global_batch_size=6, micro_batch_size=1, **kw)
    with pytest.raises(MeshError) as e:
        build_parallel(t, c, jax.devices()[:n])
    assert needle in str(e.value)


def test_pipeline_refuses_training_stage_weights_besides_adapters():
    import jax
    from jaxmoe.config import ConfigError
    from jaxmoe.lora.train import PartialTraining
    t = train_config(global_batch_size=8, micro_batch_size=1, mesh="pp=2", train_type="lora",
                     trainable_parameters=["moe/router"])
    with pytest.raises(ConfigError, match="moe/router.* not supported under pipeline parallelism"):
        PartialTraining.from_train_config(t, PIPE).make_hooks(build_parallel(t, PIPE, jax.devices()[:2]))


_REF = {}


def reference():
    if not _REF:  # 4 micro-batches of 2 rows (pp meshes without data replicas: micro_batch_size 2)
        _REF["ref"] = run_steps("", 1, 4, c=PIPE, **PIPE_OPT)
    return _REF["ref"]


@pytest.mark.parametrize("mesh,n,kw", [
    ("pp=2", 2, {}),  # stages of 3 and 2 MoE layers (one padded slot)
    ("pp=4", 4, dict(decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=2)),  # 1/1/1/2
    ("pp=2,tp=2,ep=2", 8, dict(sequence_parallel=True)),  # Megatron sequence parallelism between blocks
], ids=["pp2", "pp4-uneven", "pp2-tp2-ep2-sp"])
def test_pipeline_step_equals_single_device(mesh, n, kw):
    check_equivalence(mesh, n, 4, c=PIPE, ref=reference(), common=PIPE_OPT, **kw)


# LoRA adapters on the stage weights and dense / shared-expert layers with dropout (masks keyed by micro-batch
# and global layer, so a stage draws what the single device draws; routed experts are left out: the expert-
# parallel dispatch draws per-device masks), plus a fully trained lm_head outside the stages.
LORA = dict(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.1, modules_to_save=["lm_head"],
            target_modules=["linear_qkv", "linear_proj", "shared_experts"])


@pytest.mark.parametrize("mesh,n,kw", [
    ("pp=2", 2, LORA),
    ("pp=2,cp=2", 4, {}),  # context parallelism inside the stages
], ids=["pp2-lora", "pp2-cp2"])
def test_pipeline_lora_and_cp_equal_single_device(mesh, n, kw):
    check_built_equivalence(mesh, n, c=PIPE, **kw)


def test_pipeline_tp4_ep4_pp2_on_32_devices():
    """The design card's mesh: 32 fake devices need their own process (the suite's has 8)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(32), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "tests.parallel_utils", "tp=4,ep=4,pp=2", "32", "2", "pipe"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0 and "EQUIVALENT" in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]


def _pipeline_memory(num_micro: int) -> int:
    from tests.parallel_utils import batch_rows
    compiled, _ = run_steps("pp=2", 2, num_micro, c=PIPE, compiled=True, global_batch_size=num_micro,
                            rows=batch_rows(G=num_micro))
    return compiled.memory_analysis().temp_size_in_bytes


def test_stage_memory_grows_only_by_the_schedules_hidden_states():
    """GPipe keeps, per micro-batch, the stage input of each iteration (remat recomputes the rest), the
    embedded input and the last stage's output (and their gradients): a few hidden states [B, T, H]. Without
    the stage-level remat each micro-batch would keep every layer's activations (many times more)."""
    hidden = 1 * 64 * PIPE.hidden_size * 4  # one micro-batch's hidden state: 1 row x 64 tokens, fp32
    small, large = _pipeline_memory(2), _pipeline_memory(8)
    per_micro = (large - small) / 6
    assert per_micro <= 8 * hidden, (small, large, per_micro / hidden)


def test_checkpoint_is_canonical_and_restores_into_the_staged_storage(tmp_path):
    """Full training under pp keeps the MoE stack's master and Adam moments staged, [S, slots, ...]; a checkpoint
    holds them canonical, [L, ...] (what other layouts and the converters read: the save goes through host
    memory one leaf at a time), and restoring stages them again, bit for bit."""
    import jax

    from jaxmoe.train import checkpoint as ckpt_lib
    from jaxmoe.train.build import build_step
    from jaxmoe.train.loop import initial_state
    from tests.parallel_utils import batch_rows

    t = train_config(mesh="pp=4", global_batch_size=4, micro_batch_size=1, **PIPE_OPT)
    par = build_parallel(t, PIPE, jax.devices()[:4])
    built = build_step(t, PIPE, par, 10)
    ts, _ = built.step(initial_state(built, None, print).ts, par.put_batch(batch_rows(G=4)))  # moments != 0
    stack = lambda tree: tree["moe"]["experts_wi"]
    assert stack(ts["params"]).shape[:2] == (4, 2)  # 5 MoE layers: 2/1/1/1
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    ckpt.save(1, built.to_checkpoint(ts, "pinned_host"), None, ckpt_lib.make_meta(PIPE, t, 1, 4))
    ckpt.close()
    state, _, _ = ckpt_lib.restore(str(tmp_path), built.abstract_state(canonical=True))
    assert stack(state["params"]).shape[0] == stack(state["opt_state"][0].mu).shape[0] == PIPE.num_moe_layers
    back = built.to_storage(state)
    assert jax.tree.structure(back) == jax.tree.structure(ts)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ts)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
