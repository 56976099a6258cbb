"""Multi-process training: two local processes (jax.distributed on 127.0.0.1, 4 fake CPU devices each, gloo
collectives) run the 8-device job and log the very metrics of the single-process 8-device run, and the
checkpoint they write together resumes in one process; a bad flag fails on every process; the start-up
values come from flags, JAXMOE_/JAX_ env or a SLURM srun step."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxmoe.config import ConfigError
from jaxmoe.distributed import expand_nodelist, resolve, slurm_local_device_ids
from jaxmoe.train.args import TrainConfig
from tests.train_utils import MICRO
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"elapsed_ms", "tokens_per_sec"}  # wall clock; every other logged value must match
# A few steps of a tiny job: 32-token rows, 8 rows per step (one per data rank on 8 devices).
COMMON = ["--max_length", "32", "--global_batch_size", "8", "--micro_batch_size", "1", "--dtype", "float32",
          "--split_dataset_ratio", "0", "--lr", "3e-3", "--min_lr", "3e-4", "--lr_warmup_fraction", "0",
          "--async_save", "false", "--save_interval", "1000", "--seed", "7"]
_MULTIHOST_ENV = ("JAXMOE_COORDINATOR_ADDRESS", "JAXMOE_NUM_PROCESSES", "JAXMOE_PROCESS_ID",
                  "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def test_fake_cpu_devices_get_threads_for_concurrent_collectives():
    """XLA:CPU's default pools hold one thread per fake device: one collective in flight. jaxmoe's import gives
    4 per device (a loop holding collectives may run beside another collective), keeps a user's PJRT_NPROC,
    and recomputes one it set in a parent process with another device count."""
    import jax
    import jaxmoe

    def threads(**env):
        jaxmoe._reserve_host_threads(env)
        return env.get("PJRT_NPROC")

    flags = "--xla_force_host_platform_device_count=32 --xla_backend_optimization_level=0"
    assert threads(XLA_FLAGS=flags) == "128"
    assert threads(JAX_NUM_CPU_DEVICES="4") == "16"
    assert threads(XLA_FLAGS=flags, PJRT_NPROC="32", JAXMOE_AUTO_PJRT_NPROC="32") == "128"  # inherited
    assert threads(XLA_FLAGS=flags, PJRT_NPROC="7") == "7"
    assert threads(XLA_FLAGS=flags, NPROC="5") is None
    assert threads(XLA_FLAGS=xla_flags(1), PJRT_NPROC="32", JAXMOE_AUTO_PJRT_NPROC="32") is None
    assert os.environ["PJRT_NPROC"] == str(4 * jax.device_count())  # this worker's 8 devices got theirs


# ---- helpers shared with test_resume_mesh.py ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(devices: int, cache_dir: str | None = None, shared_cache: bool = True) -> dict:
    """`shared_cache` False (the processes of one multi-process job): no persistent compilation cache, so that
    no process loads the step from disk while its peer still compiles it past the gloo setup deadline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _MULTIHOST_ENV}
    if not shared_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    if cache_dir:  # the runs of one test compile the same programs: later runs load them from disk
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start_train(args: list[str], devices: int, cache_dir: str | None = None) -> subprocess.Popen:
    env = cli_env(devices, cache_dir, shared_cache="--coordinator_address" not in args)
    return subprocess.Popen([sys.executable, "-m", "jaxmoe.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"training process timed out after {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return p.returncode, out, err


def train_ok(args: list[str], devices: int, cache_dir: str | None = None) -> str:
    rc, out, err = finish(start_train(args, devices, cache_dir))
    assert rc == 0, f"python -m jaxmoe.train {' '.join(args)} failed ({rc}):\n{out[-3000:]}\n{err[-5000:]}"
    return out


def read_metrics(save_dir: str) -> list[dict]:
    with open(os.path.join(save_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in (json.loads(line) for line in f) if r.get("split", "train") == "train"]


def assert_metrics_close(got: list[dict], want: list[dict], rtol: float) -> None:
    """Same iterations and keys; every non-timing value within rtol (rtol=0: bitwise)."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), (g["iteration"], set(g) ^ set(w))
        for k in sorted(set(w) - TIMING_KEYS):
            if isinstance(w[k], str):
                assert g[k] == w[k], (w["iteration"], k, g[k], w[k])
                continue
            a, b = np.asarray(g[k], np.float64), np.asarray(w[k], np.float64)
            if rtol == 0:
                assert np.array_equal(a, b), (w["iteration"], k, g[k], w[k])
            else:
                err = np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)) if a.size else 0.0
                assert err <= rtol, (w["iteration"], k, g[k], w[k], err)


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "config.json")
    MICRO.save_json(path)
    return path


# gloo's "[Gloo] Rank r is connected to n peer ranks. Expected number of connected peer ranks is : n", in the
# pieces its threads write separately (they interleave between processes' threads at any piece boundary)
GLOO_PIECES = re.compile(r"\[Gloo\] Rank|is connected to|peer ranks\.|Expected number of connected peer ranks is :|\d+")


# ---- two processes == one process ----------------------------------------------------------------------
def test_two_processes_match_one_process(micro_model, tmp_path):
    # ep=4 spans both processes (devices 0-3 live in process 0): the MoE all_to_all, the gradient reduction
    # over the token-splitting expert axis and the batch assembly all cross the process boundary; tp=2 stays
    # inside each process. The two-process run stops at iteration 2 with a checkpoint both processes wrote;
    # one process resumes from it for the last step.
    args = ["--model", micro_model, "--mesh", "ep=4,tp=2", "--train_iters", "3", *COMMON]
    cache = str(tmp_path / "jit_cache")  # the single and the resumed run compile the same step
    port = free_port()
    multi = [start_train([*args, "--save", str(tmp_path / "multi"), "--exit_interval", "2", "--coordinator_address",
                          f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)], devices=4)
             for i in range(2)]
    single = start_train([*args, "--save", str(tmp_path / "single")], devices=8, cache_dir=cache)
    results = [finish(p) for p in (*multi, single)]
    for (rc, out, err), who in zip(results, ("process 0", "process 1", "single process")):
        assert rc == 0, f"{who} failed ({rc}):\n{out[-3000:]}\n{err[-5000:]}"
    (_, out0, _), (_, out1, _), _ = results
    assert "iteration        2/       3" in out0 and "exiting at iteration 2" in out0
    # Text output is process 0's job; process 1's stdout holds only gloo's connection lines (GLOO_PIECES).
    ours = GLOO_PIECES.sub(" ", out1).split()
    assert not ours, f"process 1 printed more than gloo's lines: {ours[:20]}\n{out1[-2000:]}"

    want = read_metrics(str(tmp_path / "single"))
    assert [r["iteration"] for r in want] == [1, 2, 3]
    got = read_metrics(str(tmp_path / "multi"))  # written by process 0 alone
    assert all(r["num_devices"] == 8 for r in got)
    assert_metrics_close(got, want[:2], rtol=1e-6)

    from jaxmoe.train.checkpoint import latest_step, read_meta
    assert latest_step(str(tmp_path / "multi")) == 2 and read_meta(str(tmp_path / "multi"))["consumed_samples"] == 16
    # The checkpoint the two processes wrote holds the whole state: one process continues the run from it.
    out = train_ok([*args, "--load", str(tmp_path / "multi"), "--save", str(tmp_path / "resumed")], 8, cache)
    assert "at iteration 2" in out
    assert_metrics_close(read_metrics(str(tmp_path / "resumed")), want[2:], rtol=1e-6)


def test_bad_flag_fails_on_every_process(micro_model):
    # The mesh is checked after jax.distributed has joined the processes: each must exit with the error
    # instead of one failing and the other waiting forever at the first collective.
    port = free_port()
    procs = [start_train(["--model", micro_model, "--mesh", "tp=3", *COMMON, "--coordinator_address",
                          f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)], devices=4)
             for i in range(2)]
    for i, p in enumerate(procs):
        rc, out, err = finish(p, timeout=300)
        assert rc == 2, (rc, out[-2000:], err[-3000:])
        assert f"[process {i}/2] error: --mesh 'tp=3'" in err, err[-3000:]


_STOP_PROBE = """
import os, signal, sys
from jaxmoe.distributed import maybe_initialize
from jaxmoe.train.args import TrainConfig
from jaxmoe.train.loop import StopSignal
maybe_initialize(TrainConfig(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])))
stop = StopSignal(True)
before = stop.requested()
if sys.argv[2] == "1":
    os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it; the check after the step agrees on it
print(before, stop.requested(), stop.name)
"""


def test_a_signal_on_one_process_stops_every_process():
    # SIGTERM reaches one process (a preempted node): both must stop after the same step, or the other one
    # would wait forever in the next step's collectives.
    address = f"127.0.0.1:{free_port()}"
    env = cli_env(1, shared_cache=False)
    procs = [subprocess.Popen([sys.executable, "-c", _STOP_PROBE, address, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [finish(p, timeout=120) for p in procs]
    assert [rc for rc, _, _ in outs] == [0, 0], [err[-2000:] for _, _, err in outs]
    lines = [[line for line in out.splitlines() if not line.startswith("[Gloo]")][-1] for _, out, _ in outs]
    assert lines == ["False True a stop signal on another process", "False True SIGTERM"]


_MANIFEST_PROBE = """
import os, sys
from jax.experimental import multihost_utils
from jaxmoe.distributed import maybe_initialize
from jaxmoe.train import checkpoint
from jaxmoe.train.args import TrainConfig
maybe_initialize(TrainConfig(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])))
step = sys.argv[3]
checkpoint.write_manifest(step, int(sys.argv[2]), 2)  # each process: the CRC32s of its files i::2
multihost_utils.sync_global_devices("written")
print("intact:", checkpoint.verify_step(step)[0])
multihost_utils.sync_global_devices("checked")
if sys.argv[2] == "0":  # state/b is the second file: process 1's share, both when writing and when checking
    with open(os.path.join(step, "state", "b"), "r+b") as f:
        f.write(b"X")
multihost_utils.sync_global_devices("damaged")
print("damaged:", checkpoint.verify_step(step)[0])
"""


def test_checkpoint_manifest_is_shared_by_the_processes(tmp_path):
    step = tmp_path / "7"
    (step / "state").mkdir(parents=True)
    for name in "abc":
        (step / "state" / name).write_bytes(os.urandom(1000))
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _MANIFEST_PROBE, address, str(i), str(step)], cwd=ROOT,
                              env=cli_env(1, shared_cache=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    outs = [finish(p, timeout=120) for p in procs]
    assert [rc for rc, _, _ in outs] == [0, 0], [err[-2000:] for _, _, err in outs]
    assert sorted(os.listdir(step)) == ["jaxmoe_manifest.1.json", "jaxmoe_manifest.json", "state"]
    for _, out, _ in outs:  # process 0 found nothing in its own files and still reports process 1's finding
        lines = [line for line in out.splitlines() if not line.startswith("[Gloo]")]
        assert lines[0] == "intact: None"
        assert lines[1].startswith("damaged: state/b differs from what was saved (CRC32 of bytes 0-1000: ")


# ---- where the start-up values come from ---------------------------------------------------------------
def _t(**kw):
    return TrainConfig(**kw)


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("gpu[7,09-11],login2", ["gpu7", "gpu09", "gpu10", "gpu11", "login2"]),
    ("a-[1-2]-ib,b[3]", ["a-1-ib", "a-2-ib", "b3"]),
    ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-", "node01]", "node[a-b]", "node[5-3]", ""])
def test_expand_nodelist_rejects(text):
    with pytest.raises(ConfigError, match="SLURM nodelist"):
        expand_nodelist(text)


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_STEP_NODELIST": "gpu[03-06]",
         "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}


def test_single_process_when_nothing_is_set():
    assert resolve(_t(), env={}) is None
    assert resolve(_t(), env={**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # srun -n 1
    # an sbatch script's own shell (no srun step): one process, though SLURM_NTASKS says 8
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert resolve(_t(), env=batch) is None


def test_slurm_step():
    s = resolve(_t(), env=SLURM)
    # first host of the step (not of the job), port derived from the job id, one task per node: all devices
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("gpu03:" + str(20000 + 123456 % 10000), 4, 2)
    assert s.local_device_ids is None and s.source == "SLURM"
    s = resolve(_t(), env={**SLURM, "JAXMOE_COORDINATOR_PORT": "4242", "SLURM_STEP_NODELIST": ""})
    assert s.coordinator_address == "gpu01:4242"  # no step nodelist: the job's
    s = resolve(_t(), env={**SLURM, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})  # srun -n 2 in a bigger job
    assert (s.num_processes, s.process_id) == (2, 1)
    # flags override SLURM value by value; --num_processes 1 opts out of the multi-process setup
    s = resolve(_t(coordinator_address="10.0.0.1:9999"), env=SLURM)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:9999", 4, 2)
    assert resolve(_t(num_processes=1), env=SLURM) is None


def test_slurm_several_tasks_per_node():
    env = {**SLURM, "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x4)", "SLURM_GPUS_ON_NODE": "8"}
    assert resolve(_t(), env=env).local_device_ids == (2, 3)  # 8 GPUs / 4 tasks: task 1 takes GPUs 2 and 3
    assert slurm_local_device_ids({**env, "SLURM_GPUS_ON_NODE": ""}) == (1,)  # unknown GPU count: one each
    # SLURM already gave each task its own GPUs (--gpus-per-task): leave the visible devices alone
    assert slurm_local_device_ids({**env, "CUDA_VISIBLE_DEVICES": "2,3"}) is None
    # uneven tasks per node ('2,4(x2),2'): node 3 runs 2 tasks, so task 1 there takes GPUs 4-7
    assert slurm_local_device_ids({**env, "SLURM_STEP_TASKS_PER_NODE": "2,4(x2),2", "SLURM_NODEID": "3"}) == \
        (4, 5, 6, 7)


def test_flags_and_env():
    s = resolve(_t(coordinator_address="h:1234", num_processes=2, process_id=1), env={})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == ("h:1234", 2, 1, None)
    env = {"JAXMOE_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2",
           "JAX_COORDINATOR_ADDRESS": "ignored:2", "JAXMOE_LOCAL_DEVICE_IDS": "0,1"}
    s = resolve(_t(), env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == ("h:1", 3, 2, (0, 1))
    assert resolve(_t(process_id=0), env={**env, "JAX_PROCESS_ID": "5"}).process_id == 0  # flag wins


@pytest.mark.parametrize("kw, env, match", [
    (dict(coordinator_address="h:1"), {}, r"got coordinator_address from --coordinator_address but no "
                                          r"num_processes, process_id"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1"}, r"from environment JAX_COORDINATOR_ADDRESS but no num_processes"),
    (dict(num_processes=2, process_id=0), {}, "no coordinator_address"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), {}, "--coordinator_address='h': expected "
                                                                        "host:port"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, r"--process_id=2: must be in \[0, 2\)"),
    ({}, {"JAXMOE_COORDINATOR_ADDRESS": "h:1", "JAXMOE_NUM_PROCESSES": "two", "JAXMOE_PROCESS_ID": "0"},
     "JAXMOE_NUM_PROCESSES='two': expected an integer"),
    ({}, {**SLURM, "JAXMOE_COORDINATOR_PORT": "99999"}, "JAXMOE_COORDINATOR_PORT='99999'"),
    ({}, {**SLURM, "SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
    ({}, {"JAXMOE_COORDINATOR_ADDRESS": "h:1", "JAXMOE_NUM_PROCESSES": "2", "JAXMOE_PROCESS_ID": "0",
          "JAXMOE_LOCAL_DEVICE_IDS": "0;1"}, "JAXMOE_LOCAL_DEVICE_IDS='0;1'"),
])
def test_partial_or_bad_settings(kw, env, match):
    with pytest.raises(ConfigError, match=match):
        resolve(_t(**kw), env=env)
