"""Every mesh computes the single-device train step: loss, every updated parameter (fp32, 1e-5 relative to
the tensor's scale) and the router bias after the update."""
import numpy as np
import pytest

from tests.parallel_utils import assert_states_close, run_steps


_REF = {}


def reference(num_micro):
    if num_micro not in _REF:
        _REF[num_micro] = run_steps("", 1, num_micro)
    return _REF[num_micro]


MESHES = [
    ("dp=2", 2, {}),
    ("tp=2", 2, {}),
    ("tp=2", 2, {"sequence_parallel": True}),
    ("ep=2", 2, {}),
    ("ep=4", 4, {}),
    ("dp=2,tp=2,ep=2", 8, {}),
    ("ep=2,tp=2", 4, {"moe_transport": "all_to_all"}),
    # capacity factor E/k: each expert may keep every local token (nothing dropped), in the manual dp x ep region
    ("dp=2,ep=2", 4, {"moe_expert_capacity_factor": 4.0}),
]


@pytest.mark.parametrize("mesh,n,kw", MESHES, ids=[m + ("+sp" if k.get("sequence_parallel") else "") for m, _, k in MESHES])
def test_mesh_step_equals_single_device(mesh, n, kw):
    dp_total = {"dp=2": 2, "ep=2": 2, "ep=4": 4, "dp=2,tp=2,ep=2": 4, "ep=2,tp=2": 2, "dp=2,ep=2": 4}.get(mesh, 1)
    num_micro = 8 // dp_total  # micro_batch_size 1 per data rank
    ts, ms = run_steps(mesh, n, num_micro, **kw)
    ref_ts, ref_ms = reference(num_micro)
    for key in ("lm_loss", "mtp_loss", "grad_norm", "aux_loss"):
        np.testing.assert_allclose(float(ms[0][key]), float(ref_ms[0][key]), rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ms[0]["expert_load"]), np.asarray(ref_ms[0]["expert_load"]))
    assert_states_close(ts, ref_ts)
    if "moe_expert_capacity_factor" in kw:
        assert int(ms[0]["moe_dropped"]) == 0
