"""The design card's command on 32 fake CPU devices: `python -m jaxmoe.train --mesh tp=4,ep=4,pp=2` on the
bundled tiny config trains with Megatron log lines (validation through the pipeline too) and stops with a
checkpoint; the same job on tp=2,ep=4 (8 devices, no pipeline) logs the same metrics, and resuming the
pipeline's checkpoint on tp=2,ep=4 continues it exactly as that run. Both meshes have 4 data ranks and 2
micro-batches of 1 row each, so the objective is the same; only the layout changes."""
from __future__ import annotations

from tests.test_multihost import assert_metrics_close, finish, read_metrics, start_train, train_ok

ARGS = ["--config", "configs/tiny.yaml", "--train_iters", "3", "--max_length", "64", "--global_batch_size", "8",
        "--micro_batch_size", "1", "--eval_interval", "2", "--eval_iters", "1", "--save_interval", "1000",
        "--async_save", "false", "--split_dataset_ratio", "0.05"]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "num_devices"} for r in rows]  # 32 vs 8


def test_tp4_ep4_pp2_trains_saves_and_resumes_on_another_mesh(tmp_path):
    cache = str(tmp_path / "jit_cache")  # the 8-device runs compile the same step
    stopped, full, resumed = (str(tmp_path / n) for n in ("stopped", "full", "resumed"))
    procs = [start_train([*ARGS, "--mesh", "tp=4,ep=4,pp=2", "--save", stopped, "--exit_interval", "2"], 32),
             start_train([*ARGS, "--mesh", "tp=2,ep=4", "--save", full], 8, cache)]
    (rc, out, err), (rc_full, out_full, err_full) = (finish(p, timeout=900) for p in procs)
    assert rc == 0, out[-3000:] + err[-5000:]
    assert rc_full == 0, out_full[-3000:] + err_full[-5000:]
    assert "mesh dp=1,pp=2,ep=4,cp=1,tp=4," in out
    assert "> pipeline: 2 stages, MoE layers per stage 1/1, GPipe over 3 iterations (bubble 33%" in out
    assert "iteration        2/       3 |" in out and "lm loss:" in out and "exiting at iteration 2" in out
    assert "validation loss at iteration 2" in out, out[-3000:]
    want = read_metrics(full)
    assert_metrics_close(_strip(read_metrics(stopped)), _strip(want[:2]), rtol=1e-5)
    out_res = train_ok([*ARGS, "--mesh", "tp=2,ep=4", "--load", stopped, "--save", resumed], 8, cache)
    assert f"resumed from {stopped} at iteration 2" in out_res and "mesh dp=1,pp=1,ep=4,cp=1,tp=2," in out_res
    assert_metrics_close(read_metrics(resumed), want[2:], rtol=1e-5)
