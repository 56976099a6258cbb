"""Every parameter's compute and master / optimizer-state PartitionSpec against the checked-in golden tables
(tests/golden/shardings/, MaxText's sharding_compare_test): a weight silently left replicated, or split over
another axis, fails here although the numerics stay right. After an intended change regenerate the tables:
python tests/golden/regen_shardings.py"""
import jax
import pytest

from jaxmoe.config import load_model_config
from jaxmoe.lora.train import PartialTraining
from jaxmoe.model.params import is_spec, param_specs, tree_paths
from jaxmoe.parallel.setup import build_parallel
from jaxmoe.train.optimizer import make_optimizer
from tests import sharding_tables
from tests.sharding_tables import LAYOUTS, differences, layout_config, sharding_table


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_shardings_match_the_golden_table(name):
    diff = differences(name)
    assert not diff, "shardings changed (regenerate with python tests/golden/regen_shardings.py if intended):\n" + \
        "\n".join(diff)


def test_a_changed_rule_is_reported_with_the_parameter(monkeypatch):
    real = sharding_tables.logical_rules
    monkeypatch.setattr(sharding_tables, "logical_rules", lambda **kw: {**real(**kw), "mlp": None})
    diff = differences("dp2_tp2_ep2")
    assert any(line.startswith("dp2_tp2_ep2: dense/mlp_wi: golden `shape [1, 64, 2, 192] compute P(None, None, "
                               "None, 'tensor')") for line in diff), diff
    specs = param_specs(load_model_config("tiny"))
    uses_mlp = {p for p, s in zip(tree_paths(specs, is_leaf=is_spec), jax.tree.leaves(specs, is_leaf=is_spec))
                if "mlp" in s.axes}  # dense MLP and shared expert; attention and routed experts untouched
    assert {line.split(": ")[1] for line in diff} == uses_mlp


def _row(shape, compute, master) -> str:
    fmt = lambda sh: "P(" + ", ".join(repr(p) for p in sh.spec) + ")"
    return f"shape {list(shape)} compute {fmt(compute)} master {fmt(master)}"


@pytest.mark.parametrize("name", sorted(n for n, (devices, _) in LAYOUTS.items() if devices <= 8))
def test_tables_are_what_build_parallel_lays_out(name):
    """The tables are derived without devices; on 8 fake devices the trainer's own layout agrees."""
    devices, t = layout_config(name)
    c = load_model_config(t.model)
    par = build_parallel(t, c, jax.devices()[:devices])
    if t.train_type == "full":
        compute, master, shapes = par.param_shardings, par.master_shardings, par.param_shapes
        _assert_moments_like_masters(par, t)
    else:
        pt = PartialTraining.from_train_config(t, c)
        compute, master = pt.compute_shardings(par), pt.trainable_shardings(par)
        shapes = pt.trainable_abstract()
    rows = [_row(s.shape, cs, ms) for s, cs, ms in zip(jax.tree.leaves(shapes), jax.tree.leaves(compute),
                                                         jax.tree.leaves(master))]
    assert dict(zip(tree_paths(shapes), rows)) == sharding_table(name)


def _assert_moments_like_masters(par, t):
    """Adam's two moments of each weight have its master's layout (the golden 'master' column)."""
    opt = par.state_shardings(make_optimizer(t, t.train_iters))["opt_state"]
    keys = lambda path: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    moments = [(keys(path), sh.spec) for path, sh in jax.tree_util.tree_flatten_with_path(opt)[0]]
    for p, ms in zip(tree_paths(par.master_shardings), jax.tree.leaves(par.master_shardings)):
        got = [spec for k, spec in moments if k.split("/", 2)[1:] in (["mu", p], ["nu", p])]
        assert len(got) == 2 and all(spec == ms.spec for spec in got), (p, ms.spec, got)
