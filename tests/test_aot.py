"""The AOT tool's CPU-testable parts: the CUDA-plugin error, replica-group placement, the roofline. Its GPU
compiles run in tests_gpu/ (CUDA-wheel venv)."""
import subprocess
import sys

import pytest

from jaxmoe import aot, perf
from jaxmoe.config import get_preset


def test_without_cuda_wheels_one_error_names_the_install_command():
    p = subprocess.run([sys.executable, "-m", "jaxmoe.aot", "--gpus", "8", "--mesh", "tp=2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and "pip install -e '.[cuda12]'" in p.stderr
    assert "Traceback" not in p.stderr


def test_gpus_must_fill_whole_hosts():
    with pytest.raises(aot.AotError, match="--gpus 12: must be a positive multiple of --gpus_per_host 8"):
        aot.gpu_devices(aot.GPUS["h100"], 12)


@pytest.mark.parametrize("attrs, n, groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", 4, [[0, 1], [2, 3]]),
    ("replica_groups={}, to_apply=%add", 4, [[0, 1, 2, 3]]),
    ("replica_groups=[2,4]<=[8], to_apply=%add", 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add", 8, [[0, 2, 4, 6], [1, 3, 5, 7]]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=4] {'axis_0'}, use_global_device_ids=true", 16,
     [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]),
    ("replica_groups=mesh['a'=2,'b'=2,'c'=2] {'a','c'}, x", 8, [[0, 1, 4, 5], [2, 3, 6, 7]]),
])
def test_replica_groups(attrs, n, groups):
    assert perf.replica_groups(attrs, n) == groups
    assert perf._group_size(attrs, n) == len(groups[0])


def test_roofline_places_groups_on_nvlink_or_infiniband():
    gpu = aot.GPUS["h100"]
    inside = {"kind": "all-reduce", "wire_bytes": 45e9, "attrs": "replica_groups=[2,8]<=[16], to_apply=%a"}
    across = {"kind": "all-reduce", "wire_bytes": 5e9, "attrs": "replica_groups=[8,2]<=[2,8]T(1,0), to_apply=%a"}
    r = aot.roofline(989e12, [inside, across], gpu, per_host=8, mfu=0.5, link_efficiency=1.0)
    assert r["compute_s"] == pytest.approx(2.0)
    assert r["nvlink_wire_bytes"] == 45e9 and r["ib_wire_bytes"] == 5e9
    assert r["comm_s"] == pytest.approx(45e9 / 450e9 + 5e9 / 50e9)
    assert r["serial_s"] == pytest.approx(2.2) and r["overlapped_s"] == pytest.approx(2.0)


def test_model_flops_full_is_three_forwards_and_lora_two():
    from jaxmoe.flops import forward_flops_per_token
    from jaxmoe.train.args import parse_args
    c = get_preset("tiny")
    full = parse_args(["--max_length", "64", "--global_batch_size", "4"])
    lora = parse_args(["--max_length", "64", "--global_batch_size", "4", "--train_type", "lora"])
    fwd = forward_flops_per_token(c, 64) * 4 * 64
    assert aot.model_flops_per_step(full, c) == pytest.approx(3 * fwd)
    assert aot.model_flops_per_step(lora, c) == pytest.approx(2 * fwd)


def test_ragged_all_to_all_counts_the_rows_the_dispatch_sends():
    hlo = """HloModule m, num_partitions=4

ENTRY %main (a: bf16[64,32], o: bf16[64,32], off: s32[4], n: s32[4]) -> bf16[64,32] {
  %a = bf16[64,32]{1,0} parameter(0)
  %o = bf16[64,32]{1,0} parameter(1)
  %off = s32[4]{0} parameter(2)
  %n = s32[4]{0} parameter(3)
  ROOT %r = bf16[64,32]{1,0} ragged-all-to-all(%a, %o, %off, %n, %off, %n), channel_id=1, replica_groups={{0,1,2,3}}
}
"""
    r = perf.collective_bytes(hlo)["ragged-all-to-all"]
    # the EP dispatch's buffer holds ep x the rows it sends: a quarter of it moves, 3/4 of that leaves the device
    assert (r["ops"], r["payload_bytes"], r["wire_bytes"]) == (1, 64 * 32 * 2 / 4, 0.75 * 64 * 32 * 2 / 4)
    # a bounded buffer (--moe_dispatch_buffer_factor 2) holds twice the rows it sends
    r = perf.collective_bytes(hlo, ragged_buffer_factor=2.0)["ragged-all-to-all"]
    assert (r["payload_bytes"], r["wire_bytes"]) == (64 * 32 * 2 / 2, 0.75 * 64 * 32 * 2 / 2)


def test_pipeline_with_as_many_micro_batches_as_stages_under_tp_sp_is_one_error():
    from jaxmoe.config import ConfigError
    from jaxmoe.parallel.setup import build_parallel
    from jaxmoe.train.args import parse_args
    from jaxmoe.train.build import build_step
    t = parse_args(["--mesh", "pp=2,tp=2,ep=2", "--sequence_parallel", "true", "--max_length", "64",
                    "--global_batch_size", "4"])
    par = build_parallel(t, get_preset("tiny"))
    with pytest.raises(ConfigError, match="2 micro-batch\\(es\\) for 2 pipeline stages"):
        build_step(t, get_preset("tiny"), par, 10)


def test_roofline_groups_of_every_device_span_the_hosts():
    every = {"kind": "all-reduce", "wire_bytes": 1e9, "attrs": "replica_groups={}, to_apply=%a"}
    one_host = aot.roofline(0.0, [every], aot.GPUS["h100"], 8, 0.5, 1.0, num_devices=8)
    two_hosts = aot.roofline(0.0, [every], aot.GPUS["h100"], 8, 0.5, 1.0, num_devices=16)
    assert (one_host["nvlink_wire_bytes"], two_hosts["ib_wire_bytes"]) == (1e9, 1e9)


def test_pipeline_live_payload_scales_only_the_per_slot_ragged_exchange():
    """GLM-4.5-Air on pp 4 (12/11/11/11 layers), 8 micro-batches: the ragged exchange runs 11 x 12 times, rows
    move in 8 x 12 of them on the busiest stage; the MTP layer's exchange (outside the loop) and every other
    collective count as they are."""
    from jaxmoe.parallel.pipeline import PipelineLayout
    layout = PipelineLayout((12, 11, 11, 11))
    ops = [{"kind": "ragged-all-to-all", "executions": 132, "payload_bytes": 11.0},
           {"kind": "ragged-all-to-all", "executions": 2, "payload_bytes": 5.0},
           {"kind": "all-gather", "executions": 132, "payload_bytes": 7.0}]
    assert perf.pipeline_live_payload(ops, 8, layout) == pytest.approx(8.0 + 5.0 + 7.0)
