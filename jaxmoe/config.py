"""Model configuration for the GLM4-MoE family (HF `Glm4MoeForCausalLM`, model_type `glm4_moe`).

`ModelConfig` mirrors the HF config.json fields one to one, reads both the legacy top-level
`rope_theta` / `partial_rotary_factor` form of the real GLM-4.5 repos and the transformers 5.x
`rope_parameters` form, and validates itself with one clear message per problem.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
    """A model or training configuration that cannot work; the message says where and how to fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944  # dense MLP (first_k_dense_replace layers)
    moe_intermediate_size: int = 1408  # each routed / shared expert
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 131072
    attention_bias: bool = True
    use_qk_norm: bool = False
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        # Real GLM configs list several eos ids; a tuple keeps the config hashable (a jit static argument).
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- validation ----------------------------------------------------------------------
    def validate(self, where: str = "model config") -> "ModelConfig":
        def bad(key: str, msg: str):
            raise ConfigError(f"{where}: `{key}` {msg}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "moe_intermediate_size"):
            if int(getattr(self, key)) <= 0:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            bad("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2 or self.rotary_dim != self.head_dim * self.partial_rotary_factor:
            bad("partial_rotary_factor", f"gives {self.head_dim} * {self.partial_rotary_factor} "
                "rotary dims; they must be a whole even number (rotate-half RoPE pairs dims)")
        if self.hidden_act != "silu":
            bad("hidden_act", f"must be 'silu' for GLM4-MoE, got {self.hidden_act!r}")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if self.num_moe_layers > 0 or self.num_nextn_predict_layers > 0:
            if self.n_routed_experts <= 0:
                bad("n_routed_experts", "must be positive when the model has MoE layers")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}], "
                    f"got {self.num_experts_per_tok}")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                bad("n_group", f"({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})")
            if not 0 < self.topk_group <= self.n_group:
                bad("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad("n_group", "leaves fewer than 2 experts per group; group scores use the top-2 of each group")
            if self.topk_group * per_group < self.num_experts_per_tok:
                bad("topk_group", f"keeps {self.topk_group * per_group} experts, fewer than "
                    f"num_experts_per_tok={self.num_experts_per_tok}")
            if self.n_shared_experts < 0:
                bad("n_shared_experts", "must be >= 0")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "must be false: GLM-4.5 has an untied LM head")
        return self

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], where: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt != "glm4_moe":
            raise ConfigError(f"{where}: model_type is {mt!r}; jaxmoe supports 'glm4_moe' "
                              "(GLM-4.5 / GLM-4.5-Air, HF Glm4MoeForCausalLM)")
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        if rope:
            rtype = rope.get("rope_type", "default")
            if rtype not in ("default", None):
                raise ConfigError(f"{where}: rope_parameters.rope_type {rtype!r} is not supported "
                                  "(GLM-4.5 uses default RoPE)")
            for k in ("rope_theta", "partial_rotary_factor"):
                if k in rope:
                    d[k] = rope[k]
        if d.get("rope_scaling"):
            raise ConfigError(f"{where}: rope_scaling={d['rope_scaling']!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        # Keys absent from the file take transformers' Glm4MoeConfig defaults, not our presets'.
        kw = dict(HF_DEFAULTS)
        kw.update({k: v for k, v in d.items() if k in names})
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if "head_dim" not in kw or kw["head_dim"] is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        try:
            cfg = cls(**kw)
        except TypeError as e:  # pragma: no cover - dataclass arity errors
            raise ConfigError(f"{where}: {e}") from None
        return cfg.validate(where)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; expected a HF config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(d, where=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 5.x writes it (rope in `rope_parameters`) plus the legacy
        top-level keys, so both old and new readers (and megatron tooling) find them."""
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d.update({
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            "attention_dropout": 0.0,
            "use_cache": True,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
            "dtype": "float32",
        })
        return d

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw).validate()


# transformers 5.23 Glm4MoeConfig defaults where they differ from ModelConfig's field defaults.
HF_DEFAULTS = {"attention_bias": False, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}

# ---- presets ---------------------------------------------------------------------------
PRESETS: dict[str, ModelConfig] = {
    "glm4.5-air": ModelConfig(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        use_qk_norm=False, n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=131072,
        pad_token_id=151329, eos_token_id=[151329, 151336, 151338]),
    "glm4.5": ModelConfig(
        vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        use_qk_norm=True, n_routed_experts=160, num_experts_per_tok=8, n_shared_experts=1,
        n_group=1, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=3,
        num_nextn_predict_layers=1, max_position_embeddings=131072,
        pad_token_id=151329, eos_token_id=[151329, 151336, 151338]),
    # Small enough to train on a 2-core CPU in a minute; same structure as the real models
    # (dense first layer, grouped router, shared expert, MTP). Vocab matches the bundled tokenizer.
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=192, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
        use_qk_norm=True, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=0, eos_token_id=[0, 7, 9]),  # <|endoftext|>, <|user|>, <|observation|> of the tiny tokenizer
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].validate(f"preset {name!r}")
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} "
                          "or pass a HF checkpoint directory") from None


def load_model_config(model: str) -> ModelConfig:
    """`--model` value -> ModelConfig: a preset name, a HF dir (config.json) or a config.json path."""
    if model in PRESETS:
        return get_preset(model)
    if os.path.isdir(model):
        return ModelConfig.from_json_file(os.path.join(model, "config.json"))
    if os.path.isfile(model):
        return ModelConfig.from_json_file(model)
    raise ConfigError(f"--model {model!r}: not a preset ({sorted(PRESETS)}), a directory or a file")
