"""`python -m jaxmoe.convert`: every direction round-trips bit-identically through the CLI, Megatron args
give back the model config, and bad inputs fail with one message (exit 2) before anything is written."""
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from jaxmoe.config import PRESETS, ModelConfig
from jaxmoe.convert.__main__ import DIRECTIONS, build_parser, config_from_megatron_args, main, parse_size
from jaxmoe.convert.mcore_dist import megatron_args
from jaxmoe.convert.safetensors_io import HFCheckpointReader, HFCheckpointWriter
from tests._mcore_helpers import random_hf, tiny_cfg, write_legacy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = os.path.join(ROOT, "jaxmoe", "assets", "tiny_tokenizer")


def write_hf_dir(path, cfg, tensors, max_shard_bytes=10 ** 9, tokenizer=True):
    with HFCheckpointWriter(path, [(k, v.shape, v.dtype) for k, v in tensors.items()],
                            max_shard_bytes=max_shard_bytes) as w:
        for k, v in tensors.items():
            w.write(k, v)
    cfg.save_json(os.path.join(path, "config.json"))
    if tokenizer:
        shutil.copy(os.path.join(TOK, "tokenizer_config.json"), path)
    return str(path)


def read_all(path) -> dict:
    r = HFCheckpointReader(path)
    return {k: r.get(k) for k in r.keys()}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)


def glm45(cfg, hf: dict) -> dict:
    """`hf` as GLM-4.5 releases it: plus the MTP layers' copies of the embedding / lm_head, which every
    converter to HF writes."""
    from jaxmoe.convert.hf_params import mtp_duplicate_keys
    return {**hf, **{copy: hf[main] for copy, main in mtp_duplicate_keys(cfg).items()}}


def cli(*args) -> int:
    return main([str(a) for a in args] + ["--quiet"])


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


@pytest.fixture(scope="module")
def hf(cfg):
    return random_hf(cfg, seed=5)


@pytest.fixture(scope="module")
def hf_dir(cfg, hf, tmp_path_factory):
    return write_hf_dir(tmp_path_factory.mktemp("src") / "hf", cfg, hf, max_shard_bytes=100_000)


def test_hf_mcore_hf_bit_identical(cfg, hf, hf_dir, tmp_path):
    """hf-to-mcore (run as `python -m`) then mcore-to-hf with the config rebuilt from common.pt's args."""
    mc = tmp_path / "mcore"
    p = subprocess.run([sys.executable, "-m", "jaxmoe.convert", "hf-to-mcore", "--input", hf_dir, "--output", str(mc),
                        "--iteration", "7", "--tp", "2", "--ep", "2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "hf:" not in p.stderr and "mcore:" in p.stderr  # the progress bar ran
    assert open(mc / "latest_checkpointed_iteration.txt").read().strip() == "7"
    from jaxmoe.convert.mcore_dist import McoreDistReader
    args = McoreDistReader(str(mc)).args
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size, args.padded_vocab_size) == (2, 2, 256)
    out = tmp_path / "back"
    assert cli("mcore-to-hf", "--input", mc, "--output", out, "--max_shard_size", "50KB") == 0
    assert_same(glm45(cfg, hf), read_all(out))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    assert ModelConfig.from_json_file(out / "config.json") == cfg
    # bf16 on the way: cast once, then bit-exact
    assert cli("hf-to-mcore", "--input", hf_dir, "--output", tmp_path / "mc16", "--dtype", "bfloat16") == 0
    assert cli("mcore-to-hf", "--input", tmp_path / "mc16", "--output", tmp_path / "back16") == 0
    got = read_all(tmp_path / "back16")
    want = {k: v if "e_score" in k else v.astype(ml_dtypes.bfloat16) for k, v in glm45(cfg, hf).items()}
    assert_same(want, got)


def test_hf_orbax_mcore_hf_bit_identical(cfg, hf, hf_dir, tmp_path):
    orb = tmp_path / "orbax"
    assert cli("hf-to-orbax", "--input", hf_dir, "--output", orb) == 0
    assert sorted(os.listdir(orb)) == ["0", "tokenizer_config.json"]
    assert cli("orbax-to-mcore", "--input", orb, "--output", tmp_path / "mc", "--save_iteration", "3") == 0
    assert os.path.isdir(tmp_path / "mc" / "iter_0000003")
    assert cli("mcore-to-hf", "--input", tmp_path / "mc", "--output", tmp_path / "back") == 0
    assert_same(glm45(cfg, hf), read_all(tmp_path / "back"))
    # orbax-to-hf directly: the MTP embedding / head copies come out as GLM-4.5 lays them out
    assert cli("orbax-to-hf", "--input", orb / "0", "--output", tmp_path / "hf2") == 0
    got = read_all(tmp_path / "hf2")
    L = cfg.num_hidden_layers
    assert_same(hf, {k: v for k, v in got.items() if not k.startswith((f"model.layers.{L}.embed_tokens",
                                                                        f"model.layers.{L}.shared_head.head"))})
    np.testing.assert_array_equal(got[f"model.layers.{L}.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert os.path.isfile(tmp_path / "hf2" / "tokenizer_config.json")
    assert ModelConfig.from_json_file(tmp_path / "hf2" / "config.json") == cfg
    # --no_mtp drops the MTP layer everywhere
    assert cli("orbax-to-hf", "--input", orb, "--output", tmp_path / "nomtp", "--no_mtp") == 0
    got = read_all(tmp_path / "nomtp")
    assert_same({k: v for k, v in hf.items() if not k.startswith(f"model.layers.{L}.")}, got)
    assert ModelConfig.from_json_file(tmp_path / "nomtp" / "config.json").num_nextn_predict_layers == 0


def test_mcore_to_orbax_and_legacy_and_reshard(cfg, hf, hf_dir, tmp_path):
    assert cli("hf-to-mcore", "--input", hf_dir, "--output", tmp_path / "mc") == 0
    assert cli("mcore-to-orbax", "--input", tmp_path / "mc", "--output", tmp_path / "orb", "--dtype", "float32") == 0
    assert cli("orbax-to-hf", "--input", tmp_path / "orb", "--output", tmp_path / "back") == 0
    got = read_all(tmp_path / "back")
    for k, v in hf.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # legacy torch format, TP=2 x PP=2 x EP=2 rank files (its args carry no model config: --config)
    write_legacy(tmp_path / "legacy", cfg, hf, tp=2, pp=2, ep=2, iteration=9, padded_vocab=256)
    cfg.save_json(tmp_path / "cfg.json")
    assert cli("legacy-to-hf", "--input", tmp_path / "legacy", "--output", tmp_path / "lg", "--config",
               tmp_path / "cfg.json") == 0
    assert_same(glm45(cfg, hf), read_all(tmp_path / "lg"))
    # hf-reshard: bf16, small shards, tokenizer files kept
    assert cli("hf-reshard", "--input", hf_dir, "--output", tmp_path / "rs", "--dtype", "bfloat16",
               "--max_shard_size", "30KB") == 0
    got = read_all(tmp_path / "rs")
    assert len([f for f in os.listdir(tmp_path / "rs") if f.endswith(".safetensors")]) > 3
    for k, v in hf.items():
        assert got[k].dtype == (np.float32 if "e_score" in k else ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[k], v.astype(got[k].dtype), err_msg=k)
    assert os.path.isfile(tmp_path / "rs" / "tokenizer_config.json")


def test_mcore_local_layer_spec_keys(cfg, hf, hf_dir, tmp_path, monkeypatch, capsys):
    """Megatron's local (non-TE) layer spec saves every layer's pre-MLP norm, a MoE layer's too, under
    `mlp.linear_fc1.layer_norm_weight` (gpt_layer_specs.py: sharded_state_dict_keys_map "pre_mlp_layernorm." ->
    "mlp.linear_fc1.layer_norm_"); mcore-to-hf reads either name."""
    import jaxmoe.convert.mcore_dist as md
    specs = md.mcore_layer_specs

    def local(c, layer):
        return [s._replace(key=s.key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))
                for s in specs(c, layer)]

    monkeypatch.setattr(md, "mcore_layer_specs", local)
    assert cli("hf-to-mcore", "--input", hf_dir, "--output", tmp_path / "mc") == 0
    monkeypatch.undo()
    keys = md.McoreDistReader(str(tmp_path / "mc")).tensor_keys()
    moe = cfg.first_k_dense_replace
    assert f"decoder.layers.{moe}.mlp.linear_fc1.layer_norm_weight" in keys
    assert not [k for k in keys if "pre_mlp_layernorm" in k]
    assert cli("mcore-to-hf", "--input", tmp_path / "mc", "--output", tmp_path / "back") == 0
    assert_same(glm45(cfg, hf), read_all(tmp_path / "back"))
    # neither name: the error names both
    monkeypatch.setattr(md, "mcore_layer_specs", lambda c, layer: [s for s in specs(c, layer)
                                                                  if "pre_mlp_layernorm" not in s.key])
    assert cli("hf-to-mcore", "--input", hf_dir, "--output", tmp_path / "mc2") == 0
    monkeypatch.undo()
    err = _bad(capsys, "mcore-to-hf", "--input", tmp_path / "mc2", "--output", tmp_path / "back2")
    assert (f"missing tensor `decoder.layers.{moe}.pre_mlp_layernorm.weight` (or "
            f"`decoder.layers.{moe}.mlp.linear_fc1.layer_norm_weight`)") in err


@pytest.mark.parametrize("name", ["tiny", "glm4.5-air", "glm4.5"])
def test_config_from_megatron_args(name, cfg):
    c = cfg if name == "tiny" else PRESETS[name].replace(pad_token_id=None, eos_token_id=None)
    a = megatron_args(c, padded_vocab=c.vocab_size + 128)
    got = config_from_megatron_args(a, "common.pt")
    want = c.replace(max_position_embeddings=got.max_position_embeddings)
    assert got == want
    # ms-swift may keep moe_layer_freq as its string form; Megatron-LM without vocab_size: padded rows
    a.moe_layer_freq = f"[0]*{c.first_k_dense_replace}+[1]*{c.num_hidden_layers - c.first_k_dense_replace}"
    del a.vocab_size
    got = config_from_megatron_args(a, "common.pt")
    assert got.first_k_dense_replace == c.first_k_dense_replace and got.vocab_size == c.vocab_size + 128


def test_help_documents_every_flag():
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "direction")
    assert set(sub.choices) == set(DIRECTIONS) | {"verify", "merge-lora"}
    for name, p in sub.choices.items():
        for act in p._actions:
            assert act.help, f"{name} {act.option_strings} has no --help text"
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30 and parse_size("1024") == 1024
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert.py"), "hf-to-mcore", "--help"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "--padded_vocab_size" in p.stdout and "--max_shard_size" in p.stdout


def _bad(capsys, *args) -> str:
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_inputs_one_clear_error(cfg, hf, hf_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    # not a checkpoint dir, for each kind of source
    assert "neither model.safetensors nor" in _bad(capsys, "hf-to-orbax", "--input", empty, "--config",
                                                   os.path.join(hf_dir, "config.json"), "--output", out)
    assert "no config.json" in _bad(capsys, "hf-to-mcore", "--input", empty, "--output", out)
    assert "not a Megatron checkpoint" in _bad(capsys, "mcore-to-hf", "--input", empty, "--output", out)
    assert "no <step>/state/" in _bad(capsys, "orbax-to-hf", "--input", empty, "--output", out)
    assert "not a Megatron checkpoint" in _bad(capsys, "legacy-to-hf", "--input", empty, "--output", out)
    # missing metadata.json in a torch_dist iteration dir
    assert cli("hf-to-mcore", "--input", hf_dir, "--output", tmp_path / "mc") == 0
    os.remove(tmp_path / "mc" / "iter_0000001" / "metadata.json")
    assert "no metadata.json" in _bad(capsys, "mcore-to-hf", "--input", tmp_path / "mc", "--output", out)
    # orbax: missing _METADATA; meta model_config that disagrees with the state
    assert cli("hf-to-orbax", "--input", hf_dir, "--output", tmp_path / "orb") == 0
    shutil.copytree(tmp_path / "orb", tmp_path / "orb2")
    os.remove(tmp_path / "orb" / "0" / "state" / "_METADATA")
    assert "no _METADATA" in _bad(capsys, "orbax-to-mcore", "--input", tmp_path / "orb", "--output", out)
    wrong = cfg.replace(moe_intermediate_size=24)
    wrong.save_json(tmp_path / "wrong.json")
    assert "experts_wi` has shape" in _bad(capsys, "orbax-to-hf", "--input", tmp_path / "orb2", "--output", out,
                                          "--config", tmp_path / "wrong.json")
    # HF: shape mismatch vs config; a missing expert
    assert "config.json implies" in _bad(capsys, "hf-to-orbax", "--input", hf_dir, "--output", out,
                                         "--config", tmp_path / "wrong.json")
    src = {k: v for k, v in hf.items() if k != "model.layers.3.mlp.experts.2.up_proj.weight"}
    bad_dir = write_hf_dir(tmp_path / "noexp", cfg, src)
    assert "missing `model.layers.3.mlp.experts.2.up_proj.weight`" in _bad(
        capsys, "hf-to-mcore", "--input", bad_dir, "--output", out)
    # mcore: an expert's chunk missing from .metadata
    from jaxmoe.convert.unpickle import load_pickle
    assert cli("hf-to-mcore", "--input", hf_dir, "--output", tmp_path / "mc2") == 0
    md_path = tmp_path / "mc2" / "iter_0000001" / ".metadata"
    md = load_pickle(str(md_path))
    k = "decoder.layers.2.mlp.experts.experts.linear_fc2.weight"
    md.state_dict_metadata[k].chunks.pop(1)
    import pickle
    pickle.dump(md, open(md_path, "wb"))
    assert "a shard (e.g. an expert) is missing" in _bad(capsys, "mcore-to-orbax", "--input", tmp_path / "mc2",
                                                         "--output", out)
    # flags
    assert "--max_shard_size" in _bad(capsys, "hf-to-mcore", "--input", hf_dir, "--output", out,
                                      "--max_shard_size", "lots")
    assert "--dtype" in _bad(capsys, "hf-to-mcore", "--input", hf_dir, "--output", out, "--dtype", "int4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert "not empty" in _bad(capsys, "mcore-to-hf", "--input", tmp_path / "mc2", "--output", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not os.path.exists(out)  # nothing was written by any failed run
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]


def test_failure_midway_leaves_nothing(hf_dir, tmp_path, monkeypatch, capsys):
    """A source that fails after writing started (here: the 40th tensor read raises) leaves no output."""
    real_get = HFCheckpointReader.get
    calls = {"n": 0}

    def flaky(self, key):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(f"simulated read error at {key}")
        return real_get(self, key)

    monkeypatch.setattr(HFCheckpointReader, "get", flaky)
    for d in ("hf-to-orbax", "hf-to-mcore", "hf-reshard"):
        calls["n"] = 0
        with pytest.raises(OSError, match="simulated"):
            cli(d, "--input", hf_dir, "--output", tmp_path / d)
        assert calls["n"] >= 40
        assert not os.path.exists(tmp_path / d) or not os.listdir(tmp_path / d), os.listdir(tmp_path / d)
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]
    # an existing empty output dir stays empty
    (tmp_path / "keep").mkdir()
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        cli("hf-to-orbax", "--input", hf_dir, "--output", tmp_path / "keep")
    assert os.listdir(tmp_path / "keep") == []
