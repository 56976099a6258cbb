"""The design card's command on 32 fake CPU devices: `python -m jaxmoe.train --mesh tp=4,ep=4,pp=2` on the
bundled tiny config trains with Megatron log lines (validation through the pipeline too), stops with a
checkpoint, and the run resumes on another mesh (tp=2,ep=4 on 8 devices, no pipeline) with the metrics of the
uninterrupted 32-device run. Both meshes have 4 data ranks and 2 micro-batches of 1 row each, so the
objective is the same; only the layout changes."""
from __future__ import annotations

from tests.test_multihost import assert_metrics_close, finish, read_metrics, start_train, train_ok

ARGS = ["--config", "configs/tiny.yaml", "--train_iters", "3", "--max_length", "64", "--global_batch_size", "8",
        "--micro_batch_size", "1", "--eval_interval", "2", "--eval_iters", "1", "--save_interval", "1000",
        "--async_save", "false", "--split_dataset_ratio", "0.05"]


def test_tp4_ep4_pp2_trains_saves_and_resumes_on_another_mesh(tmp_path):
    cache = str(tmp_path / "jit_cache")
    pp = [*ARGS, "--mesh", "tp=4,ep=4,pp=2"]
    stopped, full, resumed = (str(tmp_path / n) for n in ("stopped", "full", "resumed"))
    out = train_ok([*pp, "--save", stopped, "--exit_interval", "2"], 32, cache)
    assert "mesh dp=1,pp=2,ep=4,cp=1,tp=4," in out
    assert "> pipeline: 2 stages, MoE layers per stage 1/1, GPipe over 3 iterations (bubble 33%" in out
    assert "iteration        2/       3 |" in out and "lm loss:" in out and "exiting at iteration 2" in out
    assert "validation loss at iteration 2" in out, out[-3000:]
    # the uninterrupted run (compiled programs from the cache) and the resume on 8 devices, side by side
    procs = [start_train([*pp, "--save", full], 32, cache),
             start_train([*ARGS, "--mesh", "tp=2,ep=4", "--load", stopped, "--save", resumed], 8, cache)]
    (rc_full, out_full, err_full), (rc_res, out_res, err_res) = (finish(p, timeout=900) for p in procs)
    assert rc_full == 0, out_full[-3000:] + err_full[-5000:]
    assert rc_res == 0, out_res[-3000:] + err_res[-5000:]
    assert f"resumed from {stopped} at iteration 2" in out_res and "mesh dp=1,pp=1,ep=4,cp=1,tp=2," in out_res
    want = read_metrics(full)
    assert_metrics_close(read_metrics(stopped), want[:2], rtol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "num_devices"} for r in rows]  # 8 vs 32
    assert_metrics_close(strip(read_metrics(resumed)), strip(want[2:]), rtol=1e-5)
