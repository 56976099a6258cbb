"""The jaxmoe model equals transformers' Glm4MoeForCausalLM: logits (fp32 and bf16) and gradients."""
import zlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmoe.config import ModelConfig
from jaxmoe.convert.hf_params import params_from_hf
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.transformer import default_batch, forward, lm_logits, logits_fn
from tests.hf_ref import disk_tensors, random_hf_model

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
            num_nextn_predict_layers=0, rope_theta=10000.0, max_position_embeddings=256)
CONFIGS = {
    "qknorm_groups_scaled": dict(use_qk_norm=True, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                 first_k_dense_replace=1, attention_bias=True),
    "plain_dense2": dict(use_qk_norm=False, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                         first_k_dense_replace=2, num_hidden_layers=4, attention_bias=True, n_shared_experts=2),
    "groups4_nonorm": dict(use_qk_norm=True, n_group=4, topk_group=2, routed_scaling_factor=1.7,
                           norm_topk_prob=False, first_k_dense_replace=1, attention_bias=False,
                           num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.25),
}


def make(name):
    c = ModelConfig(**{**BASE, **CONFIGS[name]}).validate()
    m = random_hf_model(c, seed=zlib.crc32(name.encode()) % 1000)  # str hash() differs per process
    tensors = disk_tensors(m)
    params, state = params_from_hf(tensors.__getitem__, c)
    return c, m, params, state


def ids_for(c, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, c.vocab_size, (B, T)).astype(np.int64)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_fp32(name):
    c, m, params, state = make(name)
    assert np.abs(np.asarray(state["moe_bias"])).max() > 0.1  # the correction bias really is non-zero
    for B, T in ((2, 7), (1, 13)):
        ids = ids_for(c, B, T, seed=T)
        with torch.no_grad():
            ref = m(torch.from_numpy(ids)).logits.numpy()
        out = np.asarray(jax.jit(logits_fn, static_argnums=(3,))(params, state, jnp.asarray(ids, jnp.int32), c))
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err <= 1e-5, (name, B, T, err)


def test_logits_bf16_top1():
    c, m, params, state = make("qknorm_groups_scaled")
    ids = ids_for(c, 2, 11, seed=3)
    mb = m.to(torch.bfloat16)
    with torch.no_grad():
        ref = mb(torch.from_numpy(ids)).logits.float().numpy()
    opts = ModelOptions(compute_dtype="bfloat16")
    pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
    out = np.asarray(logits_fn(pb, state, jnp.asarray(ids, jnp.int32), c, opts))
    # Positions whose top-2 HF logits are closer than bf16 resolution are genuine ties; skip those.
    srt = np.sort(ref, -1)
    margin = srt[..., -1] - srt[..., -2]
    clear = margin > 0.02 * np.abs(ref).max()
    print("top1 agreement all:", (out.argmax(-1) == ref.argmax(-1)).mean(), "clear frac:", clear.mean())
    assert clear.mean() > 0.6
    np.testing.assert_array_equal(out.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("name", ["qknorm_groups_scaled", "plain_dense2"])
def test_grads_match_torch(name):
    c, m, params, state = make(name)
    ids = ids_for(c, 2, 9, seed=5)
    logits = m(torch.from_numpy(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, c.vocab_size),
                                             torch.from_numpy(ids[:, 1:]).reshape(-1))
    loss.backward()
    ref_grads, _ = params_from_hf(disk_tensors(m, grads=True).__getitem__, c)

    def jloss(p):
        lg = lm_logits(p, forward(p, state, default_batch(jnp.asarray(ids, jnp.int32)), c, ModelOptions(),
                                  with_mtp=False)[0], ModelOptions())
        lp = jax.nn.log_softmax(lg[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(ids[:, 1:, None], jnp.int32), -1))

    val, grads = jax.jit(jax.value_and_grad(jloss))(params)
    assert abs(float(val) - loss.item()) <= 1e-5 * abs(loss.item())
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g), np.asarray(r)
        scale = np.abs(r).max()
        assert scale > 0, path
        assert np.abs(g - r).max() <= 1e-4 * scale, (jax.tree_util.keystr(path), np.abs(g - r).max() / scale)
