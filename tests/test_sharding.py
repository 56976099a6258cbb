"""The sharding model code applies is explicit (jaxmoe/sharding.py): a hashable Sharding in ModelOptions, no
hidden state. The train steps of every layout are proven equal to one device elsewhere (test_parallel_equiv,
test_folding, test_context_parallel, test_pipeline); here: what a Sharding does on its own."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmoe.mesh import make_mesh, parse_mesh
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.params import init_params, init_state
from jaxmoe.model.transformer import logits_fn
from jaxmoe.sharding import REPLICA_AXIS, Sharding, logical_rules
from tests.train_utils import MICRO


def test_options_carry_the_sharding_as_a_static_argument():
    """Two equal Shardings are one jit cache entry; the constraints are in the program only when the options
    carry a mesh, and the logits are the same."""
    mesh = make_mesh(parse_mesh("tp=2", 2), jax.devices()[:2])
    sharded = ModelOptions(sharding=Sharding(mesh, logical_rules()))
    assert sharded == ModelOptions(sharding=Sharding(mesh, logical_rules()))
    assert hash(sharded) == hash(ModelOptions(sharding=Sharding(mesh, logical_rules())))
    params, state = init_params(MICRO, jax.random.key(0)), init_state(MICRO)
    ids = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % MICRO.vocab_size
    fn = jax.jit(logits_fn, static_argnums=(3, 4))
    texts = {o: fn.lower(params, state, ids, MICRO, o).as_text() for o in (ModelOptions(), sharded)}
    assert "sharding_constraint" not in texts[ModelOptions()]
    assert "sharding_constraint" in texts[sharded] and '{"tensor"}' in texts[sharded]
    np.testing.assert_allclose(np.asarray(fn(params, state, ids, MICRO, sharded)),
                               np.asarray(fn(params, state, ids, MICRO, ModelOptions())), rtol=1e-5, atol=1e-6)


def test_replica_mode_leaves_data_to_the_vmap():
    """In the data-replica vmap (parallel/replicas.py) `data` shards the vmapped dimension: specs drop it and
    token statistics summed over `data` are also summed over the vmap axis; outside it they are not."""
    mesh = make_mesh(parse_mesh("dp=2,tp=2", 4), jax.devices()[:4])
    sh = Sharding(mesh, logical_rules())
    assert sh.spec(("batch", "length", "embed")) == P(("data", "expert"), "sequence", None)
    assert sh.in_replicas().spec(("batch", "length", "embed")) == P("expert", "sequence", None)
    x = jnp.arange(3.0)
    summed = jax.vmap(lambda v: sh.in_replicas().psum_manual(v, ("data", "expert")), axis_name=REPLICA_AXIS)(x)
    np.testing.assert_array_equal(summed, [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(jax.vmap(lambda v: sh.psum_manual(v, ("data", "expert")))(x), x)
    assert Sharding().constrain(x, ("batch",)) is x  # no mesh: one device, no constraint
