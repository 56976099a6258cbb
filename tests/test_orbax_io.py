"""Orbax (jaxmoe.train checkpoint) conversion: what the streaming writer lays down is what orbax's own restore
reads (full, partial, sharded over a mesh); training checkpoints with optimizer state read back; a real
training run started from a converted checkpoint converts to HF and transformers agrees with jaxmoe;
peak RSS of converting a ~2 GB model stays near a few tensors."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmoe.convert.hf_params import params_from_hf
from jaxmoe.convert.orbax_io import OrbaxCheckpointReader, iter_orbax_hf, write_orbax
from jaxmoe.model.params import init_state, param_shapes
from jaxmoe.train import checkpoint as ckpt_lib
from jaxmoe.train.step import init_train_state
from tests._mcore_helpers import random_hf, tiny_cfg
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eq_tree(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


def test_orbax_restore_reads_streamed_checkpoint(cfg, tmp_path):
    hf = random_hf(cfg, seed=2)
    step_dir = write_orbax(str(tmp_path / "o"), cfg, hf.__getitem__, step=5)
    assert step_dir.endswith("/5") and ckpt_lib.latest_step(str(tmp_path / "o")) == 5
    params, state = params_from_hf(hf.__getitem__, cfg)
    # partial restore onto a mesh (experts sharded 4 ways, layers replicated) as jaxmoe.train --finetune does
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding

    def sh(path, s):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = P(None, "expert") if name.endswith(("experts_wi", "experts_wo")) else P()
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NS(mesh, spec))
    want = {"params": jax.tree_util.tree_map_with_path(sh, param_shapes(cfg)),
            "model_state": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NS(mesh, P())),
                                        init_state(cfg))}
    got, data, meta = ckpt_lib.restore(str(tmp_path / "o"), want, partial=True)
    assert data is None and meta["iteration"] == 5
    assert ckpt_lib.model_config_from_meta(meta) == cfg
    _eq_tree(got["params"], params)
    _eq_tree(got["model_state"], state)
    assert got["params"]["moe"]["experts_wi"].sharding.spec == P(None, "expert")
    full, _, _ = ckpt_lib.restore(str(tmp_path / "o"), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                                    {"params": params, "model_state": state}))
    _eq_tree(full["params"], params)
    # the generate CLI's loader takes it too
    from jaxmoe.generate import load_checkpoint_weights
    p2, s2, c2 = load_checkpoint_weights(str(tmp_path / "o"))
    _eq_tree(p2, params)
    assert c2 == cfg


def test_format_pinned_to_what_orbax_itself_writes(cfg, tmp_path):
    """write_orbax lays out orbax's format by hand (orbax has no public per-slice writer): its metadata must
    equal orbax's own non-OCDBT save of the same tree, so an orbax upgrade that changes the format fails here."""
    import orbax.checkpoint as ocp
    hf = random_hf(cfg, seed=2)
    ours = write_orbax(str(tmp_path / "ours"), cfg, hf.__getitem__, step=1)
    params, state = params_from_hf(hf.__getitem__, cfg)
    mgr = ocp.CheckpointManager(str(tmp_path / "orbax"), item_handlers={
        "state": ocp.StandardCheckpointHandler(use_ocdbt=False), "meta": ocp.JsonCheckpointHandler()})
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "model_state": state}),
                                        meta=ocp.args.JsonSave({"iteration": 1})))
    mgr.wait_until_finished()
    mgr.close()
    theirs = str(tmp_path / "orbax" / "1")

    def load(d, *p):
        return json.load(open(os.path.join(d, *p)))
    assert load(ours, "_CHECKPOINT_METADATA")["item_handlers"] == load(theirs, "_CHECKPOINT_METADATA")["item_handlers"]
    a, b = load(ours, "state", "_METADATA"), load(theirs, "state", "_METADATA")
    assert {k: v for k, v in a.items() if k != "tree_metadata"} == {k: v for k, v in b.items() if k != "tree_metadata"}
    assert a["tree_metadata"].keys() == b["tree_metadata"].keys()
    for k, v in b["tree_metadata"].items():
        got = a["tree_metadata"][k]
        assert got["key_metadata"] == v["key_metadata"], k
        assert {**got["value_metadata"], "write_shape": None} == {**v["value_metadata"], "write_shape": None}, k
    for leaf in ("params.embed", "params.moe.experts_wi", "model_state.moe_bias"):  # zarr metadata but the chunks
        za, zb = load(ours, "state", leaf, ".zarray"), load(theirs, "state", leaf, ".zarray")
        assert {**za, "chunks": None} == {**zb, "chunks": None}, leaf


def test_reader_skips_optimizer_state_of_training_checkpoints(cfg, tmp_path):
    """A checkpoint as jaxmoe.train writes it (OCDBT, opt_state, counters, data item) reads back as HF tensors."""
    hf = random_hf(cfg, seed=4)
    params, state = params_from_hf(hf.__getitem__, cfg)
    ts = init_train_state(params, state, optax.adamw(1e-3))
    ck = ckpt_lib.Checkpointer(str(tmp_path / "train"), async_save=False)
    ck.save(3, ts, {"step": 3}, {"model_config": cfg.to_hf_dict(), "iteration": 3, "consumed_samples": 12})
    ck.close()
    r = OrbaxCheckpointReader(str(tmp_path / "train"))
    assert r.use_ocdbt and any(p[0] == "opt_state" for p in r.leaves)
    got = dict(iter_orbax_hf(r))
    for k, v in hf.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        np.testing.assert_array_equal(r.get(k), v, err_msg=k)


def test_training_run_from_converted_checkpoint_to_hf(tmp_path):
    """HF -> orbax (CLI); `python -m jaxmoe.train --load <orbax> --finetune` trains a step and saves; that
    checkpoint -> HF (CLI); transformers' logits on it equal jaxmoe's on the training checkpoint."""
    import torch
    from transformers import Glm4MoeForCausalLM

    from jaxmoe.convert.__main__ import main
    from jaxmoe.generate import load_checkpoint_weights
    from jaxmoe.model.transformer import logits_fn
    from tests.hf_ref import disk_tensors, random_hf_model
    from tests.test_convert_cli import write_hf_dir
    from tests.train_utils import MICRO

    c = MICRO
    src = write_hf_dir(tmp_path / "hf", c, disk_tensors(random_hf_model(c, seed=1)), tokenizer=False)
    assert main(["hf-to-orbax", "--input", src, "--output", str(tmp_path / "orb"), "--quiet"]) == 0
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "jaxmoe.train", "--load", str(tmp_path / "orb"), "--finetune",
                        "--save", str(tmp_path / "run"), "--train_iters", "1", "--save_interval", "1",
                        "--global_batch_size", "2", "--micro_batch_size", "2", "--max_length", "32",
                        "--lr", "1e-2", "--lr_warmup_iters", "0", "--mtp_num_layers", "0", "--dtype", "float32",
                        "--split_dataset_ratio", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "finetune: weights from" in p.stdout
    assert main(["orbax-to-hf", "--input", str(tmp_path / "run"), "--output", str(tmp_path / "out"),
                 "--quiet"]) == 0
    params, state, cfg = load_checkpoint_weights(str(tmp_path / "run"))
    start, _, _ = load_checkpoint_weights(str(tmp_path / "orb"))
    step = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start)))
    assert 0 < step < 0.1  # one optimizer step away from the converted weights, not from a random init
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (2, 24))
    ours = np.asarray(logits_fn(params, state, jnp.asarray(ids, jnp.int32), cfg))
    m = Glm4MoeForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    m.config._experts_implementation = "eager"
    with torch.no_grad():
        ref = m(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


RSS_SCRIPT = textwrap.dedent("""
    import sys
    from jaxmoe.convert.__main__ import main
    rc = main(sys.argv[1:] + ["--quiet"])
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork + exec, so a child of a big pytest
    # process would report the parent's peak
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
    print("MAXRSS", int(hwm) * 1024, rc)
""")


def _peak(args) -> int:
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("MAXRSS")]
    assert line and line[0].split()[2] == "0", p.stderr[-2000:]
    return int(line[0].split()[1])


def test_peak_rss_converting_2gb_model(tmp_path):
    """hf-to-orbax and orbax-to-hf of a 2.1 GB fp32 model each peak far below the model size."""
    from jaxmoe.config import ModelConfig
    from jaxmoe.convert.hf_layout import hf_tensor_specs
    from jaxmoe.convert.safetensors_io import HFCheckpointWriter
    c = ModelConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024,
                    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                    n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                    num_nextn_predict_layers=0)
    specs = hf_tensor_specs(c)
    total = sum(int(np.prod(s.shape)) * 4 for s in specs)
    assert total > 2 * 10 ** 9
    block = np.random.default_rng(0).random(1 << 20, dtype=np.float32)  # tiled: cheap to make on a busy box
    with HFCheckpointWriter(tmp_path / "hf", [(s.key, s.shape, np.float32) for s in specs]) as w:
        for i, s in enumerate(specs):
            w.write(s.key, np.resize(np.roll(block, i), s.shape))
    c.save_json(tmp_path / "hf" / "config.json")
    w_peak = _peak(["hf-to-orbax", "--input", tmp_path / "hf", "--output", tmp_path / "orb"])
    r_peak = _peak(["orbax-to-hf", "--input", tmp_path / "orb", "--output", tmp_path / "back"])
    print(f"peak RSS: hf-to-orbax {w_peak / 2**20:.0f} MiB, orbax-to-hf {r_peak / 2**20:.0f} MiB, "
          f"model {total / 2**20:.0f} MiB")
    assert w_peak < 768 * 2 ** 20 and r_peak < 768 * 2 ** 20, (w_peak, r_peak)
    key = "model.layers.5.mlp.experts.31.down_proj.weight"
    from jaxmoe.convert.safetensors_io import HFCheckpointReader
    np.testing.assert_array_equal(HFCheckpointReader(tmp_path / "back").get(key),
                                  HFCheckpointReader(tmp_path / "hf").get(key))
