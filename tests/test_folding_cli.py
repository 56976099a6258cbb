"""The seed job through the trainer CLI, scaled to the bundled tiny model: ms-swift's Megatron LoRA SFT flags
(tp 4, pp 2, cp 2, ep 4, etp 1, sequence parallelism, distributed optimizer, LoRA all-linear) on 16 fake
devices. dp is 1, so the 4 expert-parallel ranks are the 4 tensor ranks (MoE parallel folding) and context
parallelism runs inside the pipeline stages. Its metrics equal the single-device LoRA run's, and its
checkpoint (saved at the exit interval) resumes on one device as that run's last iteration. LoRA dropout is
0 here: the expert-parallel dispatch draws its own dropout mask per device (tests/test_pipeline.py checks
dropout under the pipeline on the other adapters)."""
from __future__ import annotations

from tests.test_multihost import assert_metrics_close, finish, read_metrics, start_train, train_ok
from tests.test_pipeline_cli import ARGS, _strip

SEED = ["--tensor_model_parallel_size", "4", "--pipeline_model_parallel_size", "2", "--context_parallel_size", "2",
        "--expert_model_parallel_size", "4", "--expert_tensor_parallel_size", "1", "--sequence_parallel", "true",
        "--use_distributed_optimizer", "true"]
LORA = ["--train_type", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--target_modules", "all-linear", "--lr", "1e-2"]


def test_seed_job_folds_ep_over_tensor_and_equals_one_device(tmp_path):
    cache = str(tmp_path / "jit_cache")  # the resumed run compiles the single-device step again
    folded, single, resumed = (str(tmp_path / n) for n in ("folded", "single", "resumed"))
    procs = [start_train([*ARGS, *LORA, *SEED, "--save", folded, "--exit_interval", "2"], 16),
             start_train([*ARGS, *LORA, "--save", single], 1, cache)]
    (rc, out, err), (rc1, out1, err1) = (finish(p, timeout=1200) for p in procs)
    assert rc == 0, out[-3000:] + err[-5000:]
    assert rc1 == 0, out1[-3000:] + err1[-5000:]
    assert "mesh dp=1,pp=2,ep=1,cp=2,tp=4,ep_fold=tp," in out
    assert "exiting at iteration 2" in out and "validation loss at iteration 2" in out
    want = read_metrics(single)
    assert_metrics_close(_strip(read_metrics(folded)), _strip(want[:2]), rtol=1e-5)
    out_res = train_ok([*ARGS, *LORA, "--load", folded, "--save", resumed], 1, cache)
    assert f"resumed from {folded} at iteration 2" in out_res
    assert_metrics_close(read_metrics(resumed), want[2:], rtol=1e-5)
