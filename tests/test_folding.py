"""Megatron's parallel flags and MoE parallel folding (docs/parallelism.md): the flag -> mesh mapping, one
message per impossible combination, ZeRO-1 over every replica axis, and a folded layout's train step equal to
the single-device step."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxmoe.mesh import MeshError, MeshSpec, megatron_mesh, parse_mesh
from jaxmoe.parallel.setup import build_parallel
from jaxmoe.sharding import zero_spec_all
from tests.parallel_utils import assert_states_close, run_steps
from tests.test_parallel_equiv import reference
from tests.train_utils import MICRO, train_config

import numpy as np


@pytest.mark.parametrize("devices,sizes,want", [
    # the seed job: tp 4, pp 2, cp 2, ep 4 on 16 GPUs -> experts over the 4 tensor ranks
    (16, dict(tp=4, pp=2, cp=2, ep=4), MeshSpec(1, 2, 1, 2, 4, ("tensor",))),
    # Megatron-Bridge's GLM-4.5-Air layouts: ep divides dp, no folding needed
    (8, dict(pp=2, ep=4), MeshSpec(1, 2, 4, 1, 1)),
    (32, dict(pp=4, ep=8), MeshSpec(1, 4, 8, 1, 1)),
    (8, dict(tp=2, ep=8), MeshSpec(1, 1, 4, 1, 2, ("tensor",))),  # ep = tp x 4 data ranks
    (8, dict(tp=4, cp=2, ep=2), MeshSpec(1, 1, 1, 2, 4, ("sequence",))),  # ep = the 2 context ranks
    (8, dict(tp=2, cp=2, ep=8), MeshSpec(1, 1, 2, 2, 2, ("sequence", "tensor"))),
    # expert tensor parallelism: experts split over tensor, the expert-parallel group from context x data
    (16, dict(tp=4, pp=2, cp=2, ep=2, etp=4), MeshSpec(1, 2, 1, 2, 4, ("sequence",), etp=4)),
    (8, dict(tp=2, ep=4, etp=2), MeshSpec(1, 1, 4, 1, 2, etp=2)),
])
def test_megatron_flags_map_to_a_folded_mesh(devices, sizes, want):
    spec = megatron_mesh(devices, **sizes)
    assert spec == want and spec.size == devices and spec.ep_size == sizes["ep"]
    assert parse_mesh(spec.describe(), devices) == spec  # the --mesh short form round-trips


@pytest.mark.parametrize("devices,sizes,msg", [
    (6, dict(tp=4), "tp x pp x cp = 4 does not divide the 6 devices"),
    (16, dict(tp=4, pp=2, cp=2, ep=3), "= 3 must divide tp x cp x dp = 4 x 2 x 1 = 8"),
    (16, dict(tp=4, pp=2, cp=2, ep=4, etp=2), "--expert_tensor_parallel_size 2 must be 1 or tp (4)"),
    (16, dict(tp=4, pp=2, cp=2, ep=4, etp=4), "= 16 must divide tp x cp x dp = 4 x 2 x 1 = 8"),
    (24, dict(tp=2, cp=4, ep=6, etp=2), "ep must divide dp (3) or be cp (4) times a divisor of dp"),
    (4, dict(tp=4, ep=2), "ep must divide dp (1), or be tp (4), cp (1) or cp x tp (4) times a divisor of dp"),
    (4, dict(tp=0), "--tensor_model_parallel_size 0: must be >= 1"),
])
def test_impossible_megatron_layouts(devices, sizes, msg):
    with pytest.raises(MeshError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        megatron_mesh(devices, **sizes)


def test_flags_and_mesh_are_exclusive_and_fold_needs_the_axis():
    with pytest.raises(MeshError, match="both set the parallel layout"):
        build_parallel(train_config(mesh="tp=2", tensor_model_parallel_size=2), MICRO, jax.devices()[:2])
    with pytest.raises(MeshError, match="ep_fold folds `tensor` but its size is 1"):
        parse_mesh("ep=2,ep_fold=tp", 2)
    with pytest.raises(MeshError, match="`dp` cannot be folded"):
        parse_mesh("tp=2,ep_fold=dp", 2)
    with pytest.raises(MeshError, match="etp=3: the expert tensor parallel size must be 1 or tp"):
        parse_mesh("tp=2,etp=3", 2)
    with pytest.raises(MeshError, match="cannot also be folded"):
        parse_mesh("tp=2,etp=2,ep_fold=tp", 2)


def test_zero_spec_covers_every_replica_axis():
    mesh = dict(data=2, stage=1, expert=1, sequence=2, tensor=4)
    assert zero_spec_all(P(None, "tensor"), (1024, 512), mesh) == P(("data", "sequence"), "tensor")
    assert zero_spec_all(P(), (32,), mesh) == P(("data", "sequence", "tensor"))
    assert zero_spec_all(P(), (6,), mesh) == P("data")  # 6 is not divisible by data x sequence: replicated there
    # folded experts: already split over tensor, ZeRO over the rest on the largest free dim
    assert zero_spec_all(P(("expert", "tensor")), (8, 32, 2, 16), mesh) == \
        P(("expert", "tensor"), ("data", "sequence"), None, None)
    # pipelines: `stage` alone on the largest dim, the others together on the next
    assert zero_spec_all(P(), (16, 32), dict(mesh, stage=2)) == P(("data", "sequence", "tensor"), "stage")
    assert zero_spec_all(P(), (32,), dict(mesh, stage=2)) == P("stage")


FOLDED = [
    # tp 2, cp 2, dp 2, ep 8: the experts split over expert x sequence x tensor, one per device (ETP 1)
    (8, dict(tensor_model_parallel_size=2, context_parallel_size=2, expert_model_parallel_size=8,
             sequence_parallel=True), ("expert", "sequence", "tensor"), None, P("tensor", ("expert", "sequence"))),
    # tp 2, dp 2, ep 2, etp 2: each expert's FFN split over tensor, the experts over the data ranks
    (4, dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=2),
     "expert", "tensor", P("tensor", "expert")),
]


@pytest.mark.parametrize("n,kw,exp_axes,ffn_axis,embed_master", FOLDED, ids=["etp1_ep8_cp2_tp2", "etp2_ep2_tp2"])
def test_folded_step_equals_single_device(n, kw, exp_axes, ffn_axis, embed_master):
    """One step on a folded layout equals the single-device step: loss terms 1e-5, expert load exactly, every
    param 1e-5, router bias exactly. Every weight's fp32 master and Adam moments are also split over the axes
    it is replicated on (the embedding's over the data-parallel ones)."""
    par = build_parallel(train_config(global_batch_size=8, micro_batch_size=1, **kw), MICRO, jax.devices()[:n])
    wi = par.param_shardings["moe"]["experts_wi"].spec  # [layers, E, H, 2, F]
    assert wi[1] == exp_axes and (wi[4] if len(wi) > 4 else None) == ffn_axis
    assert par.master_shardings["embed"].spec == embed_master
    num_micro = 8 // par.data_parallel_size
    ts, ms = run_steps("", n, num_micro, **kw)
    ref_ts, ref_ms = reference(num_micro)
    for key in ("lm_loss", "mtp_loss", "grad_norm", "aux_loss"):
        np.testing.assert_allclose(float(ms[0][key]), float(ref_ms[0][key]), rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ms[0]["expert_load"]), np.asarray(ref_ms[0]["expert_load"]))
    assert_states_close(ts, ref_ts)
