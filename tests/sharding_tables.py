"""Golden sharding tables (MaxText's tests/unit/sharding_compare_test.py): for each layout, every parameter's
PartitionSpec in the compute layout and in the fp32 master / optimizer-state (ZeRO) layout, derived from the
logical-axis table through the trainer's public functions, so no devices are needed (32 for tp4,ep4,pp2).
test_sharding_golden.py checks them against build_parallel on the 8-device layouts.
Regenerate the checked-in files after an intended change: python tests/golden/regen_shardings.py
"""
from __future__ import annotations

import os

import jax

from jaxmoe.config import load_model_config
from jaxmoe.lora.adapters import LoraConfig, lora_specs
from jaxmoe.mesh import MESH_AXES
from jaxmoe.sharding import logical_rules, logical_to_spec  # the rule table: its one import here
from jaxmoe.model.params import is_spec, param_specs, tree_paths
from jaxmoe.parallel.setup import mesh_spec, validate_layout, zero_spec_all
from tests.train_utils import train_config

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "shardings")
_BATCH = dict(micro_batch_size=1, global_batch_size=8)
LAYOUTS = {  # golden file name -> (devices, trainer flags); the tiny model (configs/tiny.yaml)
    "tp4_ep4_pp2": (32, dict(mesh="tp=4,ep=4,pp=2")),
    "dp2_tp2_ep2": (8, dict(mesh="dp=2,tp=2,ep=2")),
    "megatron_tp2_ep4": (8, dict(tensor_model_parallel_size=2, expert_model_parallel_size=4)),
    "megatron_tp2_ep8_folded": (8, dict(tensor_model_parallel_size=2, expert_model_parallel_size=8)),
    "megatron_tp2_ep4_etp2": (8, dict(tensor_model_parallel_size=2, expert_model_parallel_size=4,
                                      expert_tensor_parallel_size=2)),
    "lora_dp2_tp2_ep2": (8, dict(mesh="dp=2,tp=2,ep=2", train_type="lora")),  # the adapters only
}


def layout_config(name: str):
    devices, flags = LAYOUTS[name]
    return devices, train_config(**_BATCH, **flags)


def _fmt(spec) -> str:
    return "P(" + ", ".join(repr(p) for p in spec) + ")"


def sharding_table(name: str) -> dict[str, str]:
    """parameter path -> 'shape [..] compute P(..) master P(..)' for the layout `name`."""
    devices, t = layout_config(name)
    c = load_model_config(t.model)
    spec = mesh_spec(t, devices)
    validate_layout(spec, c, t.global_batch_size, t.micro_batch_size, t.max_length)
    rules = logical_rules(sequence_parallel=t.sequence_parallel, ep_axes=spec.ep_axes, etp=spec.etp,
                          pipeline=spec.stage > 1)
    mesh_shape = dict(zip(MESH_AXES, spec.shape))
    specs = param_specs(c) if t.train_type == "full" else {"lora": lora_specs(c, LoraConfig.from_train_config(t))}
    rows = {}
    for path, s in zip(tree_paths(specs, is_leaf=is_spec), jax.tree.leaves(specs, is_leaf=is_spec)):
        compute = logical_to_spec(s.axes, rules)
        master = zero_spec_all(compute, tuple(s.shape), mesh_shape)
        rows[path] = f"shape {list(s.shape)} compute {_fmt(compute)} master {_fmt(master)}"
    return rows


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.txt")


def write_golden(name: str) -> str:
    devices, t = layout_config(name)
    flags = " ".join(f"--{k} {v}" for k, v in LAYOUTS[name][1].items())
    path = golden_path(name)
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {flags} on {devices} devices, model {t.model}; regenerate: python tests/golden/regen_shardings.py\n")
        f.writelines(f"{p}: {row}\n" for p, row in sharding_table(name).items())
    return path


def read_golden(name: str) -> dict[str, str]:
    with open(golden_path(name)) as f:
        return dict(line.rstrip("\n").split(": ", 1) for line in f if not line.startswith("#"))


def differences(name: str) -> list[str]:
    """One line per parameter whose sharding differs from the checked-in table (or is new / gone)."""
    want, got = read_golden(name), sharding_table(name)
    return [f"{name}: {p}: golden `{want.get(p, 'absent')}`, now `{got.get(p, 'absent')}`"
            for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)]
