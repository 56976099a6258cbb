"""Small shared fixtures for trainer tests: a micro model and packed batches from the bundled data."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.train.args import TrainConfig

MICRO = ModelConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    use_qk_norm=True, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
                    topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, attention_bias=True,
                    pad_token_id=0, eos_token_id=[0, 7, 9])


def micro_model_dir(tmp_path) -> str:
    d = os.path.join(str(tmp_path), "micro_model")
    os.makedirs(d, exist_ok=True)
    MICRO.save_json(os.path.join(d, "config.json"))
    return os.path.join(d, "config.json")


def train_config(**kw) -> TrainConfig:
    base = dict(model="tiny", max_length=64, micro_batch_size=2, global_batch_size=4, train_iters=4, lr=3e-3,
                min_lr=3e-4, lr_warmup_iters=1, lr_warmup_fraction=None, dtype="float32", eval_interval=1000,
                eval_iters=1, split_dataset_ratio=0.0, moe_aux_loss_coeff=1e-3, save_interval=1000)
    base.update(kw)
    return TrainConfig(**base)


def packed_rows(max_length=64, n=None):
    from jaxmoe.data.loader import build_sft_data
    from jaxmoe.data.tokenizer import load_tokenizer
    from jaxmoe.train.loop import BUNDLED

    rows, _, _ = build_sft_data([os.path.join(BUNDLED, "sft_tiny.jsonl")], load_tokenizer(None), max_length,
                                packing=True, truncation_strategy="delete")
    if not n:
        return rows
    # The rows with the most packed samples (first-fit-decreasing puts the long samples first).
    pick = np.sort(np.argsort(-rows["segment_ids"].max(axis=1), kind="stable")[:n])
    return {k: v[pick] for k, v in rows.items()}


# MICRO deeper (1 dense + 5 MoE layers, uneven over 2 or 4 stages) with 4 kv heads (tp=4): pipeline tests.
PIPE = dataclasses.replace(MICRO, num_hidden_layers=6, num_key_value_heads=4)
