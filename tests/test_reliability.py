"""Nothing lost, nothing silent (issue 19), each case through the CLI as a subprocess: a --save dir holding
another run, damaged checkpoints, typed YAML, one command for first launch and requeue, SIGTERM / SIGINT,
an unwritable --save, a full disk and the NaN abort. Every failure is one `error:` line, never a traceback.

One module-scoped run (micro model, 2 steps) is shared; the runs that train use identical flags where they can
so that the persistent compilation cache serves them."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from jaxmoe.train.__main__ import main
from jaxmoe.train.args import parse_args
from tests.train_utils import micro_model_dir
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(1), "JAX_COMPILATION_CACHE_DIR": str(d / "jit"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "MODEL": micro_model_dir(d)}


def flags(env, *extra):
    return ["--model", env["MODEL"], "--max_length", "64", "--global_batch_size", "2", "--micro_batch_size", "1",
            "--split_dataset_ratio", "0", "--dtype", "float32", "--save_interval", "1", "--train_iters", "2",
            *map(str, extra)]


def cli(env, *extra, **kw):
    p = subprocess.run([sys.executable, "-m", "jaxmoe.train", *flags(env, *extra)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=900, **kw)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    return p


def error_line(p) -> str:
    """The failure is one `error:` line on stderr (other stderr lines are library warnings, never tracebacks)."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


def train_records(d):
    return [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if '"valid"' not in line]


@pytest.fixture(scope="module")
def first(env, tmp_path_factory):
    """Case 4: the same `--save X --load X` command is the first launch. X holds what a first launch killed
    during its first save leaves: config.json, args.json and an unfinished orbax tmp dir."""
    x = str(tmp_path_factory.mktemp("first") / "run")
    os.makedirs(os.path.join(x, "1.orbax-checkpoint-tmp-1764740000"))
    shutil.copy(env["MODEL"], os.path.join(x, "config.json"))
    open(os.path.join(x, "args.json"), "w").write("{}")
    p = cli(env, "--save", x, "--load", x)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"warning: --load {x} holds no complete checkpoint; starting from scratch" in p.stdout
    assert f"> --save {x}: removing 1 unfinished save(s) of a killed run: 1.orbax-checkpoint-tmp-1764740000" in p.stdout
    assert sorted(n for n in os.listdir(x) if n[0].isdigit()) == ["1", "2"]
    return x, p.stdout


def test_first_launch_and_requeue_are_one_command(first):
    x, out = first
    assert os.path.isfile(os.path.join(x, "2", "jaxmoe_manifest.json"))
    assert json.load(open(os.path.join(x, "args.1.json"))) == {}  # the earlier args.json is kept, not overwritten


def test_new_run_into_a_used_save_dir_is_refused(env, first):
    x, _ = first
    before = open(os.path.join(x, "metrics.jsonl")).read()
    err = error_line(cli(env, "--save", x))
    assert err == (f"error: --save {x}: holds checkpoints of another run (steps 2, 1); resume it with --load {x}, "
                   "pass a new --save dir, or add --overwrite to delete them")
    assert open(os.path.join(x, "metrics.jsonl")).read() == before


def test_overwrite_keeps_the_earlier_records(env, first, tmp_path):
    y = str(tmp_path / "run")
    shutil.copytree(first[0], y)
    before = open(os.path.join(y, "metrics.jsonl")).read()
    p = cli(env, "--save", y, "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"> --overwrite: deleted checkpoints 2, 1 of the earlier run in {y}" in p.stdout
    assert "> kept the earlier metrics.jsonl as metrics.1.jsonl" in p.stdout
    assert open(os.path.join(y, "metrics.1.jsonl")).read() == before
    assert [r["iteration"] for r in train_records(y)] == [1, 2]
    assert json.load(open(os.path.join(y, "args.json")))["overwrite"] is True
    assert json.load(open(os.path.join(y, "args.2.json")))["overwrite"] is False


def _biggest_state_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_damaged_latest_step_falls_back_to_the_previous(env, first, tmp_path, damage):
    d = str(tmp_path / "run")
    shutil.copytree(first[0], d)
    f = _biggest_state_file(os.path.join(d, "2"))
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        if damage == "random_bytes":
            fh.seek(size // 2)
            fh.write(os.urandom(8192))
        else:
            fh.truncate(size // 3)
    rel = os.path.relpath(f, os.path.join(d, "2"))
    p = cli(env, "--save", d, "--load", d, "--train_iters", "1")  # resume at 1 of 1: nothing to compile
    assert p.returncode == 0, p.stderr[-3000:]
    why = (f"{rel} differs from what was saved" if damage == "random_bytes"
           else f"{rel} has {size // 3} bytes, {size} when saved")
    assert f"warning: checkpoint {d}/2 is damaged ({why}" in p.stdout, p.stdout
    assert f"> resumed from {d} at iteration 1" in p.stdout
    assert not os.path.exists(os.path.join(d, "2")) and os.listdir(os.path.join(d, "damaged"))[0].startswith("2-")


def test_missing_loader_state_needs_a_flag(env, first, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(first[0], d)
    shutil.rmtree(os.path.join(d, "2", "data"))
    err = error_line(cli(env, "--save", d, "--load", d))
    assert err == (f"error: --load {d}: step 2 has no data-loader state (data/); pass --no_load_data_state to resume "
                   "with the data order restarted from the beginning")
    p = cli(env, "--save", d, "--load", d, "--no_load_data_state")
    assert p.returncode == 0 and f"> resumed from {d} at iteration 2" in p.stdout, p.stderr[-3000:]
    assert "warning: --no_load_data_state: the data order restarts from the beginning" in p.stdout


def test_yaml_values_typed_like_the_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nmin_lr: 1e-5\npacking: \"false\"\nrecompute_granularity: null\n")
    t = parse_args(["--config", str(cfg)])
    assert t.lr == 1e-3 and t.min_lr == 1e-5 and t.packing is False and t.recompute_granularity is None
    for text, msg in [("train_iters: 2.5\n", "train_iters: expected an integer, got 2.5"),
                      ("lr: 1e-3\nmicro_batch_size: null\n", "micro_batch_size: expected a value (int), got null"),
                      ("dtype: fp16\n", "dtype: expected one of bfloat16, float32, got 'fp16'"),
                      ("packing: maybe\n", "packing: expected true or false, got 'maybe'")]:
        cfg.write_text(text)
        assert main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        line = text.count("\n")
        assert err.startswith(f"error: {cfg}:{line}: {msg}") and err.count("\n") == 1, err


def test_unwritable_save_fails_before_data_loading(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = error_line(p := cli(env, "--save", str(blocker / "run")))
    assert err == f"error: --save {blocker / 'run'}: cannot write there (Not a directory); pass a writable dir"
    assert "train data" not in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_0(env, tmp_path, sig):
    s = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "jaxmoe.train", *flags(env, "--train_iters", "1000", "--save_interval", "1000",
                                                        "--save", s, "--load", s)]
    with open(tmp_path / "stderr", "w+") as ferr:  # a file: a full stderr pipe would block the trainer
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=ferr, text=True, cwd=ROOT, env=env)
        for line in p.stdout:
            if line.startswith(" iteration "):
                p.send_signal(sig)
                break
        out, _ = p.communicate(timeout=600)
        err = open(tmp_path / "stderr").read()
    assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    last = [line for line in out.splitlines() if line.startswith(">")][-1]
    it = train_records(s)[-1]["iteration"]
    assert last == f"> received {sig.name}: stopped at iteration {it}, saved {s}/{it}; resume with --load {s}"
    assert os.path.isfile(os.path.join(s, str(it), "jaxmoe_manifest.json"))
    assert not [n for n in os.listdir(s) if "tmp" in n]


def _disk_full():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))


def test_failed_save_stops_with_one_message_and_keeps_the_last_checkpoint(env, first, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(first[0], d)
    shutil.rmtree(os.path.join(d, "2"))  # resume at 1, train step 2 (the cached program), its save hits the limit
    p = cli(env, "--save", d, "--load", d, preexec_fn=_disk_full)
    err = error_line(p)
    assert err.startswith(f"error: saving checkpoint 2 in {d} failed (") and err.endswith(
        f"training stopped; the last complete checkpoint is {d}/1"), err
    assert sorted(n for n in os.listdir(d) if n.isdigit()) == ["1"]


def test_nan_abort_is_one_error_line(env, tmp_path):
    # adam_eps 0: parameters without gradient (embedding rows of unseen tokens) get 0/0 = NaN updates
    err = error_line(cli(env, "--adam_eps", "0", "--max_skipped_iters", "1", "--train_iters", "4"))
    assert err == "error: iteration 2: 1 non-finite steps in a row (--max_skipped_iters 1); lower --lr or check the data"


def test_bad_dataset_paths_and_bytes_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "\xff\xfe"}\n')
    assert main(["--dataset", str(bad), "--train_iters", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: not UTF-8 (invalid start byte at byte 14 of the line)"), err
    assert main(["--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --dataset: {str(tmp_path)!r} is a directory; pass the jsonl file(s) inside it\n"


def test_preprocess_of_an_empty_input_fails(tmp_path, capsys):
    from jaxmoe.data.preprocess import main as preprocess
    from jaxmoe.data.tokenizer import TINY_TOKENIZER_DIR
    (tmp_path / "empty.jsonl").write_text("")
    rc = preprocess(["--input", str(tmp_path / "empty.jsonl"), "--tokenizer", TINY_TOKENIZER_DIR,
                     "--output_prefix", str(tmp_path / "out"), "--no_progress"])
    assert rc == 1 and capsys.readouterr().err == (f"error: no documents in {tmp_path / 'empty.jsonl'} (the input is "
                                                   "empty); nothing written\n")
    assert os.listdir(tmp_path) == ["empty.jsonl"]


def test_context_parallel_over_all_devices_loads_its_rows():
    """--mesh cp=8 on 8 devices: each process loads whole rows (cp splits the length, never the rows); this
    was a raw NamedSharding error before any step."""
    from jaxmoe.parallel.setup import build_parallel
    from jaxmoe.train.loop import resolve_model
    t = parse_args(["--mesh", "cp=8", "--max_length", "64", "--global_batch_size", "2", "--micro_batch_size", "1"])
    par = build_parallel(t, resolve_model(t)[0])
    assert par.process_batch_shard() == (0, 1)


def test_orbax_to_hf_of_a_run_has_the_tokenizer(env, first, tmp_path):
    p = subprocess.run([sys.executable, "-m", "jaxmoe.convert", "orbax-to-hf", "--input", first[0], "--output",
                        str(tmp_path / "hf"), "--quiet"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(tmp_path / "hf"))
