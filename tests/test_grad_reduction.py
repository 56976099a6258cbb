"""Gradients are reduced once per step on data/expert replica meshes (parallel/manual.py) and over data
replicas on pipeline meshes (parallel/replicas.py): the bytes the compiled step moves in reductions do not
grow with the number of micro-batches, and equal one reduce-scatter of the fp32 gradients into the
sharded-optimizer layout."""
import jax
import numpy as np
import pytest

from jaxmoe import perf
from tests.parallel_utils import batch_rows, run_steps


def _reduction_bytes(mesh, n, global_batch):
    comp, par = run_steps(mesh, n, global_batch // n, compiled=True, global_batch_size=global_batch,
                          rows=batch_rows(G=global_batch))
    r = perf.collective_bytes(comp.as_text())
    return r["all-reduce"]["payload_bytes"] + r["reduce-scatter"]["payload_bytes"], par


@pytest.mark.parametrize("mesh,n", [("dp=2", 2), ("ep=2", 2)])
def test_gradient_reduced_once_per_step(mesh, n):
    few, par = _reduction_bytes(mesh, n, 4)  # 2 micro-batches per replica
    many, _ = _reduction_bytes(mesh, n, 16)  # 8 micro-batches per replica
    assert par.manual == ("data", "stage", "expert")
    grads = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(par.param_shapes))  # fp32 gradients
    print(f"{mesh}: reduction payload {few / grads:.3f}x (2 micro) / {many / grads:.3f}x (8 micro) of fp32 grads")
    # per micro-batch only the MoE routing counts and statistics are summed (a few hundred bytes each)
    assert many - few < 0.02 * grads, (few, many, grads)
    assert few < 1.1 * grads, (few, grads)  # one reduction of the gradients (XLA:CPU: all-reduce + slice)


def test_pipeline_with_data_replicas_reduces_once_per_step():
    """pp=2,dp=2: the data replicas are vmapped (parallel/replicas.py), so the weight gradients are summed over
    `data` after the GPipe loop, not per iteration. Same 16 rows split into 2 or 8 micro-batches (the
    activation traffic is then the same); the GSPMD pipeline it replaced moved 1.93x and 6.90x."""
    from tests.parallel_utils import PIPE_OPT
    from tests.train_utils import PIPE

    def payload(num_micro):
        comp, par = run_steps("pp=2,dp=2", 4, num_micro, c=PIPE, compiled=True, global_batch_size=16,
                              micro_batch_size=8 // num_micro, rows=batch_rows(G=16), **PIPE_OPT)
        r = perf.collective_bytes(comp.as_text())
        grads = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(par.param_shapes))
        return (r["all-reduce"]["payload_bytes"] + r["reduce-scatter"]["payload_bytes"]) / grads

    few, many = payload(2), payload(8)
    print(f"pp=2,dp=2: reduction payload {few:.3f}x (2 micro) / {many:.3f}x (8 micro) of fp32 grads")
    # no growth with the micro-batch count (the property); the rest is fixed per step: the dense layers and MTP,
    # replicated over stages, are summed over both axes, and the embedding and head are split over stage by
    # vocab, whose lookups (inputs and MTP's) and logits are reduced over stage, as is the gradient of the
    # stages' copies of the embedded inputs (activations of the same 16 rows for 2 and 8 micro-batches: this
    # tiny model's weights are few, so they weigh ~0.6x here)
    assert many <= few and few < 2.2, (few, many)
