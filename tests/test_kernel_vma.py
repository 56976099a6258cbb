"""Kernels inside a shard_map with check_vma (the train step's manual replica region on dp / ep meshes, where
parameters may be replicated or cast to varying). Pallas kernels are traced as compiled for the GPU
(interpret=False: the interpreter has its own type checks that jax 0.10 fails inside shard_map); their GPU
compilation is in tests_gpu/. The fused cross entropy is plain XLA, so it is also checked against its reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmoe.kernels import cross_entropy as ce
from jaxmoe.kernels import gmm as gmm_lib
from jaxmoe.kernels.attention import flash_attention
from jaxmoe.kernels.rms_norm import rms_norm

MESH = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])


def per_device_grad(loss, vary, in_specs):
    """value_and_grad of loss on each device; args listed in `vary` are cast to varying over data first."""
    def f(*args):
        args = [jax.lax.pcast(a, ("data",), to="varying") if i in vary else a for i, a in enumerate(args)]
        val, grads = jax.value_and_grad(loss, argnums=tuple(range(len(args) - 1)))(*args)
        return val[None], grads
    outs = (P("data"), tuple(P("data") if (s is not None and s != P()) or i in vary else P()
                             for i, s in enumerate(in_specs[:-1])))
    return jax.shard_map(f, mesh=MESH, in_specs=in_specs, out_specs=outs)


@pytest.mark.parametrize("vary_weights", [False, True])
def test_pallas_kernels_trace_in_manual_region(vary_weights):
    x = jax.ShapeDtypeStruct((256, 64), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((64,), jnp.float32)
    wg = jax.ShapeDtypeStruct((4, 64, 32), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)
    q = jax.ShapeDtypeStruct((4, 128, 4, 32), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 128, 2, 32), jnp.bfloat16)

    def loss(x, w, wg, q, k, v, sizes):
        h = rms_norm(x, w, 1e-5, interpret=False)
        y = gmm_lib.gmm(h, wg, sizes[:4], interpret=False)
        a = flash_attention(q, k, v, interpret=False)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(a.astype(jnp.float32))

    specs = (P("data"), P(), P(), P("data"), P("data"), P("data"), P("data"))
    f = per_device_grad(loss, {1, 2} if vary_weights else set(), specs)
    out = jax.eval_shape(jax.jit(f), x, w, wg, q, kv, kv, sizes)
    assert out[1][1].shape == ((128,) if vary_weights else (64,))  # replicated weight: one summed gradient


@pytest.mark.parametrize("vary_weights", [False, True])
def test_fused_cross_entropy_in_manual_region_equals_reference(vary_weights):
    h = jax.random.normal(jax.random.key(0), (2 * 24, 16))
    w = jax.random.normal(jax.random.key(1), (50, 16))
    labels = jax.random.randint(jax.random.key(2), (2 * 24,), 0, 50)

    def run(fn):
        loss = lambda h, w, lab: jnp.sum(fn(h, w, lab)[0])
        return jax.jit(per_device_grad(loss, {1} if vary_weights else set(), (P("data"), P(), P("data"))))(
            h, w, labels)

    got = run(lambda h, w, lab: ce.linear_cross_entropy(h, w, lab, block_tokens=8, block_vocab=16))
    want = run(ce.linear_cross_entropy_reference)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
