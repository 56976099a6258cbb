"""The seed job's Megatron flags scaled to the bundled tiny model through the trainer CLI: tp 4, pp 2, ep 4 with
sequence parallelism on 8 fake devices (dp 1, so ep folds over the tensor ranks; context parallelism is left
out: cp with pp is not supported yet). Its metrics equal the single-device run's, and its checkpoint
(saved at the exit interval) resumes on one device as that run's last iteration."""
from __future__ import annotations

from tests.test_multihost import assert_metrics_close, finish, read_metrics, start_train, train_ok
from tests.test_pipeline_cli import ARGS, _strip

SEED = ["--tensor_model_parallel_size", "4", "--pipeline_model_parallel_size", "2", "--expert_model_parallel_size",
        "4", "--expert_tensor_parallel_size", "1", "--sequence_parallel", "true", "--use_distributed_optimizer",
        "true"]


def test_seed_flags_fold_ep_over_tensor_and_equal_one_device(tmp_path):
    cache = str(tmp_path / "jit_cache")  # the resumed run compiles the single-device step again
    folded, single, resumed = (str(tmp_path / n) for n in ("folded", "single", "resumed"))
    procs = [start_train([*ARGS, *SEED, "--save", folded, "--exit_interval", "2"], 8),
             start_train([*ARGS, "--save", single], 1, cache)]
    (rc, out, err), (rc1, out1, err1) = (finish(p, timeout=900) for p in procs)
    assert rc == 0, out[-3000:] + err[-5000:]
    assert rc1 == 0, out1[-3000:] + err1[-5000:]
    assert "mesh dp=1,pp=2,ep=1,cp=1,tp=4,ep_fold=tp," in out
    assert "exiting at iteration 2" in out and "validation loss at iteration 2" in out
    want = read_metrics(single)
    assert_metrics_close(_strip(read_metrics(folded)), _strip(want[:2]), rtol=1e-5)
    out_res = train_ok([*ARGS, "--load", folded, "--save", resumed], 1, cache)
    assert f"resumed from {folded} at iteration 2" in out_res
    assert_metrics_close(read_metrics(resumed), want[2:], rtol=1e-5)
