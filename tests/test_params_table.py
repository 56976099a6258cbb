"""The parameter table decides weight decay: the optimizer's mask is read from it, not from a name list."""
import jax

from jaxmoe.config import get_preset
from jaxmoe.model.params import is_spec, param_shapes, param_specs
from jaxmoe.train.optimizer import NO_DECAY, decay_mask


def test_weight_decay_follows_the_table():
    c = get_preset("tiny").replace(attention_bias=True)
    specs = param_specs(c)
    assert decay_mask(param_shapes(c)) == jax.tree.map(lambda s: s.decay, specs, is_leaf=is_spec)
    assert NO_DECAY == {"attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm", "enorm", "hnorm", "bq", "bk", "bv"}
    for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        is_norm_or_bias = s.axes[-1] == "norm" or s.init in ("ones", "zeros")
        assert s.decay != is_norm_or_bias, jax.tree_util.keystr(path)
