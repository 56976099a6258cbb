"""CPU proxies of parallel efficiency: per-device memory of the compiled step, compiled FLOPs per device
(no replicated compute), and one clear error per invalid mesh."""
import jax
import numpy as np
import pytest

from jaxmoe.config import get_preset
from jaxmoe.mesh import MeshError, parse_mesh
from jaxmoe.parallel.setup import build_parallel
from tests.parallel_utils import run_steps
from tests.train_utils import MICRO, train_config


def _state_bytes_per_device(par, optimizer_too=True):
    """Analytic bytes of master params (+ Adam mu, nu) per device under the Parallel's shardings."""
    total = 0
    for sh, shape in zip(jax.tree.leaves(par.master_shardings), jax.tree.leaves(par.param_shapes)):
        local = np.prod(sh.shard_shape(shape.shape)) * 4
        total += local * (3 if optimizer_too else 1)
    return total


@pytest.fixture(scope="module")
def compiled():
    out = {}
    # One micro-batch holding the whole global batch: XLA's cost analysis counts a loop body once, so both
    # sides must have the same work per body.
    for mesh, n, dp in (("", 1, 1), ("tp=2,ep=2", 4, 2), ("dp=2", 2, 2)):
        out[mesh] = run_steps(mesh, n, 1, compiled=True, micro_batch_size=8 // dp)
    return out


def test_memory_per_device_scales_with_tp_ep_and_zero(compiled):
    single, _ = compiled[""]
    args1 = single.memory_analysis().argument_size_in_bytes
    for mesh in ("tp=2,ep=2", "dp=2"):
        comp, par = compiled[mesh]
        args = comp.memory_analysis().argument_size_in_bytes
        expect = _state_bytes_per_device(par)
        # the compiled argument bytes are the state shards (+ a small batch) exactly as the shardings say
        assert expect <= args <= expect * 1.1 + 200_000, (mesh, args, expect)
    tpep = _state_bytes_per_device(compiled["tp=2,ep=2"][1])
    full = _state_bytes_per_device(compiled[""][1])
    assert abs(args1 - full) <= 0.1 * full + 200_000
    # MICRO: embedding/head/attention/dense split by tp=2, experts by ep=2 -> about half per device
    assert tpep <= 0.6 * full
    # ZeRO-1: master params and both Adam moments split over dp=2
    assert _state_bytes_per_device(compiled["dp=2"][1]) <= 0.55 * full


def test_compiled_flops_per_device_not_replicated(compiled):
    single = compiled[""][0].cost_analysis()["flops"]
    for mesh, n in (("tp=2,ep=2", 4), ("dp=2", 2)):
        per_dev = compiled[mesh][0].cost_analysis()["flops"]
        assert per_dev <= 1.25 * single / n, (mesh, per_dev / (single / n))


@pytest.mark.parametrize("mesh,devices,msg", [
    ("tp=3", 8, "does not divide the 8 devices"),
    ("dp=3,tp=2", 8, "must equal the device count"),
    ("tp=8", 8, "num_attention_heads 4 is not divisible by tp"),
    ("tp=4", 8, "num_key_value_heads 2 is not divisible by tp"),
    ("ep=16", 16, "n_routed_experts 8 is not divisible by ep"),
    ("xp=2", 8, "unknown axis `xp`"),
    ("tp=two", 8, "is not an integer"),
    ("tp2", 8, "is not key=value"),
])
def test_invalid_mesh_messages(mesh, devices, msg):
    with pytest.raises(MeshError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        build_parallel(train_config(mesh=mesh, global_batch_size=16, micro_batch_size=1), MICRO,
                       [jax.devices()[0]] * devices)


def test_invalid_layout_messages():
    c = MICRO.replace(vocab_size=1023)
    with pytest.raises(MeshError, match="vocab_size 1023 is not divisible by tp"):
        build_parallel(train_config(mesh="tp=2", global_batch_size=8), c, jax.devices()[:2])
    with pytest.raises(MeshError, match="must be a multiple of micro_batch_size x dp x ep"):
        build_parallel(train_config(mesh="dp=2,ep=2", global_batch_size=6, micro_batch_size=1), MICRO,
                       jax.devices()[:4])
    with pytest.raises(MeshError, match="fewer than the 4 pipeline stages"):
        build_parallel(train_config(mesh="pp=4", global_batch_size=8), MICRO, jax.devices()[:4])
    assert parse_mesh("tensor=2,expert=2", 8).data == 2  # long names; dp fills the rest
