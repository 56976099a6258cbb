"""`python -m jaxmoe.convert verify`: transformers and jaxmoe agree on converted checkpoints (HF, orbax,
torch_dist), and a checkpoint with one expert perturbed fails (exit 1 with a message); bad input exits 2."""
import os
import shutil

import numpy as np
import pytest

from jaxmoe.convert.__main__ import main
from tests._mcore_helpers import tiny_cfg
from tests.hf_ref import disk_tensors, random_hf_model
from tests.test_convert_cli import TOK, write_hf_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    c = tiny_cfg().replace(vocab_size=1024, num_nextn_predict_layers=0)  # vocab of the bundled tiny tokenizer
    t = disk_tensors(random_hf_model(c, seed=7))
    hf = write_hf_dir(d / "hf", c, t)
    shutil.copy(os.path.join(TOK, "tokenizer.json"), hf)
    bad = dict(t)
    k = "model.layers.3.mlp.experts.1.down_proj.weight"
    bad[k] = bad[k] + 0.5 * np.random.default_rng(0).standard_normal(bad[k].shape).astype(np.float32)
    corrupt = write_hf_dir(d / "corrupt", c, bad)
    for args in (["hf-to-orbax", "--input", hf, "--output", d / "orb"],
                 ["hf-to-mcore", "--input", hf, "--output", d / "mc"],
                 ["hf-to-orbax", "--input", corrupt, "--output", d / "orb_bad"]):
        assert main([str(a) for a in args] + ["--quiet"]) == 0
    shutil.copytree(d / "orb", d / "run")  # a training run's root: step dirs beside config.json and args.json
    shutil.copy(d / "hf" / "config.json", d / "run")
    (d / "run" / "args.json").write_text("{}")
    return d


def verify(*args) -> int:
    return main(["verify"] + [str(a) for a in args])


@pytest.mark.parametrize("kind", ["orb", "mc", "run"])
def test_verify_passes_on_converted(model_dirs, kind, capsys):
    d = model_dirs
    assert verify("--hf", d / "hf", "--jaxmoe", d / kind, "--prompts", "2", "--seq_len", "12") == 0
    out = capsys.readouterr().out
    assert "verify OK" in out and "top-1 agreement 100.00%" in out and "24 tokens" in out


def test_verify_text_prompts_through_tokenizer(model_dirs, capsys):
    d = model_dirs
    assert verify("--hf", d / "hf", "--jaxmoe", d / "hf", "--text", "hello world", "--text", "a b c") == 0
    assert "verify: 2 prompt(s)" in capsys.readouterr().out


def test_verify_fails_on_perturbed_expert(model_dirs, capsys):
    d = model_dirs
    assert verify("--hf", d / "hf", "--jaxmoe", d / "orb_bad", "--prompts", "4", "--seq_len", "16") == 1
    cap = capsys.readouterr()
    assert "verify FAILED" in cap.err and "> --tol" in cap.err
    # and a loose tolerance lets the same pair pass: the exit code follows --tol
    assert verify("--hf", d / "hf", "--jaxmoe", d / "orb_bad", "--prompts", "4", "--seq_len", "16",
                  "--tol", "10") == 0


def test_verify_bad_inputs(model_dirs, tmp_path, capsys):
    d = model_dirs
    assert verify("--hf", d / "hf", "--jaxmoe", tmp_path / "nope") == 2
    assert "--jaxmoe" in capsys.readouterr().err
    assert verify("--hf", d / "hf", "--jaxmoe", d / "orb", "--prompts", "0") == 2
    assert "--prompts" in capsys.readouterr().err
    # a different model (another layer count) is refused before anything runs
    other = tmp_path / "other"
    c = tiny_cfg().replace(num_nextn_predict_layers=0)
    write_hf_dir(other, c, disk_tensors(random_hf_model(c, seed=1)))
    assert verify("--hf", d / "hf", "--jaxmoe", other) == 2
    assert "different models" in capsys.readouterr().err
