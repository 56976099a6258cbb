"""Context parallelism (`sequence` mesh axis): the load-balanced permutation, the CP attention against the
single-device reference attention, and whole train steps on cp meshes against the single-device step
(loss, MTP loss, grad norm at 1e-5 relative, every updated parameter at 1e-5 of the tensor's scale)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxmoe.mesh import MeshError, make_mesh, parse_mesh
from jaxmoe.model import reference_ops
from jaxmoe.model.transformer import shift_in_segment
from jaxmoe.parallel.context import balance_permutation, context_attention, permute_batch, unpermute
from jaxmoe.sharding import Sharding, logical_rules
from tests.parallel_utils import assert_states_close, batch_rows, run_steps
from tests.train_utils import MICRO, train_config


# ---- the permutation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,cp", [(8, 2), (64, 2), (48, 4), (16, 8)])
def test_balance_permutation_layout(T, cp):
    perm = balance_permutation(T, cp)
    c = T // (2 * cp)
    assert sorted(perm.tolist()) == list(range(T))
    for i in range(cp):  # rank i's contiguous slice = chunk i then chunk 2cp-1-i
        local = perm[i * 2 * c:(i + 1) * 2 * c]
        np.testing.assert_array_equal(local[:c], np.arange(i * c, (i + 1) * c))
        np.testing.assert_array_equal(local[c:], np.arange((2 * cp - 1 - i) * c, (2 * cp - i) * c))
    # balanced causal work: every rank's queries see the same number of (query, key<=query) pairs
    work = [int(np.sum(perm[i * 2 * c:(i + 1) * 2 * c] + 1)) for i in range(cp)]
    assert len(set(work)) == 1, work


def test_permute_batch_round_trip_and_shifts():
    rows = batch_rows(G=4, T=64)
    out = permute_batch(rows, cp=2, mtp_depths=2)
    perm = balance_permutation(64, 2)
    for k, v in rows.items():
        np.testing.assert_array_equal(unpermute(out[k], 2), v)
        np.testing.assert_array_equal(out[k], v[:, perm])
    np.testing.assert_array_equal(out["token_index"], np.broadcast_to(perm, (4, 64)))
    # the shifted MTP fields equal the model's on-device shift taken on the natural order
    seg = jnp.asarray(rows["segment_ids"])
    for key in ("labels", "loss_mask"):
        cur = jnp.asarray(rows[key])
        for d in (1, 2):
            cur = shift_in_segment(cur, seg)
            np.testing.assert_array_equal(unpermute(out[f"{key}_shift{d}"], 2), np.asarray(cur))
    assert np.any(out["labels_shift2"] != out["labels"])  # the shift is not a no-op on these rows


def test_permutation_errors():
    with pytest.raises(ValueError, match="not divisible by 2 x cp = 4"):
        balance_permutation(30, 2)
    rows = batch_rows(G=2, T=64)
    with pytest.raises(ValueError, match="already has `token_index`"):
        permute_batch(permute_batch(rows, 2), 2)
    with pytest.raises(ValueError, match="field 'bad' has shape"):
        permute_batch({**rows, "bad": np.zeros((2, 3))}, 2)


def test_mesh_validation_names_the_flag():
    from jaxmoe.parallel.setup import build_parallel
    t = train_config(mesh="cp=2", global_batch_size=8, micro_batch_size=1, max_length=62)
    with pytest.raises(MeshError, match="--max_length 62 must be divisible by 2 x cp = 4"):
        build_parallel(t, MICRO, jax.devices()[:2])
    t = train_config(mesh="cp=4", global_batch_size=8, micro_batch_size=1, max_length=60)
    with pytest.raises(MeshError, match="divisible by 2 x cp = 8"):
        build_parallel(t, MICRO, jax.devices()[:4])


# ---- the attention alone ------------------------------------------------------------------------------
def _packed_inputs(key, B, T, Nq, Nkv, D):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, Nq, D), jnp.float32)
    k = jax.random.normal(kk, (B, T, Nkv, D), jnp.float32)
    v = jax.random.normal(kv, (B, T, Nkv, D), jnp.float32)
    # row 0: segments crossing chunk borders + trailing padding; row 1: one sequence over the whole row
    seg = np.ones((B, T), np.int32)
    seg[0, T // 5:T // 2] = 2
    seg[0, T // 2:T - 5] = 3
    seg[0, T - 5:] = 0
    return q, k, v, seg


@pytest.mark.parametrize("mesh,n", [("cp=2", 2), ("cp=4", 4), ("cp=2,tp=2", 4), ("dp=2,cp=2", 4)])
def test_context_attention_matches_reference(mesh, n):
    B, T, Nq, Nkv, D = 2, 32, 4, 2, 8
    q, k, v, seg = _packed_inputs(jax.random.key(0), B, T, Nq, Nkv, D)
    w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)  # a cotangent that weighs every output

    def ref_loss(q, k, v):
        o = reference_ops.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
        return jnp.sum(o * w), o

    (_, ref_o), ref_g = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    spec = parse_mesh(mesh, n)
    cp = spec.sequence
    m = make_mesh(spec, jax.devices()[:n])
    sharding = Sharding(m, logical_rules())
    perm = balance_permutation(T, cp)
    tok = np.broadcast_to(perm, (B, T))
    put = lambda x, axes: jax.device_put(x, NamedSharding(m, sharding.spec(axes)))
    qp = put(q[:, perm], ("batch", "length_attn", "heads", "head_dim"))
    kp = put(k[:, perm], ("batch", "length_attn", "kv_heads", "head_dim"))
    vp = put(v[:, perm], ("batch", "length_attn", "kv_heads", "head_dim"))
    segp, tokp = put(seg[:, perm], ("batch", "length_attn")), put(tok, ("batch", "length_attn"))

    def cp_loss(q, k, v):
        o = context_attention(reference_ops.attention, q, k, v, segp, tokp, sharding)
        return jnp.sum(o * w[:, perm]), o

    (_, o), g = jax.jit(jax.value_and_grad(cp_loss, argnums=(0, 1, 2), has_aux=True))(qp, kp, vp)
    np.testing.assert_allclose(unpermute(np.asarray(o), cp), ref_o, rtol=1e-5, atol=1e-6)
    for name, a, b in zip("qkv", g, ref_g):
        np.testing.assert_allclose(unpermute(np.asarray(a), cp), b, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_context_attention_flash_kernel_interpret():
    """The Pallas flash kernel (interpret mode) as the local attention: its block skipping sees the permuted,
    gathered key order."""
    from jaxmoe.kernels.attention import flash_attention
    B, T, Nq, Nkv, D, cp = 1, 64, 2, 1, 16, 2
    q, k, v, seg = _packed_inputs(jax.random.key(2), B, T, Nq, Nkv, D)
    ref = reference_ops.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
    m = make_mesh(parse_mesh("cp=2", 2), jax.devices()[:2])
    perm = balance_permutation(T, cp)
    flash = lambda *a, **kw: flash_attention(*a, block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16, **kw)
    o = jax.jit(lambda q, k, v: context_attention(flash, q, k, v, seg[:, perm], np.broadcast_to(perm, (B, T)),
                                                  Sharding(m, logical_rules())))(q[:, perm], k[:, perm], v[:, perm])
    np.testing.assert_allclose(unpermute(np.asarray(o), cp), ref, rtol=1e-5, atol=1e-5)


# ---- whole train steps ------------------------------------------------------------------------------------
_REF = {}


def _unpacked_rows():
    """One padded sample per row: the 8 longest samples, so each spans several CP chunks."""
    from jaxmoe.data.loader import build_sft_data
    from jaxmoe.data.tokenizer import load_tokenizer
    from jaxmoe.train.loop import BUNDLED
    rows, _, _ = build_sft_data([os.path.join(BUNDLED, "sft_tiny.jsonl")], load_tokenizer(None), 64,
                                packing=False, truncation_strategy="delete")
    pick = np.sort(np.argsort(-(rows["segment_ids"] > 0).sum(axis=1), kind="stable")[:8])
    out = {k: v[pick] for k, v in rows.items()}
    assert out["segment_ids"].max() == 1 and (out["segment_ids"] > 0).sum(axis=1).min() > 32
    return out


def _rows(kind):
    if kind == "packed":  # the default rows: several samples per row, segments crossing CP chunk borders
        rows = batch_rows()
        assert rows["segment_ids"].max(axis=1).min() >= 2
        return rows
    return _unpacked_rows()


def _reference(kind, rows):
    if kind not in _REF:
        _REF[kind] = run_steps("", 1, 8, rows=rows)
    return _REF[kind]


CASES = [("cp=2", 2, "packed"), ("cp=2", 2, "unpacked"), ("cp=2,tp=2", 4, "packed")]


@pytest.mark.parametrize("mesh,n,kind", CASES, ids=[f"{m}-{k}" for m, _, k in CASES])
def test_cp_step_equals_single_device(mesh, n, kind):
    rows = _rows(kind)
    ref_ts, ref_ms = _reference(kind, rows)
    ts, ms = run_steps(mesh, n, 8, rows=rows)
    for key in ("lm_loss", "mtp_loss", "grad_norm", "aux_loss"):
        np.testing.assert_allclose(float(ms[0][key]), float(ref_ms[0][key]), rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ms[0]["expert_load"]), np.asarray(ref_ms[0]["expert_load"]))
    assert_states_close(ts, ref_ts)
