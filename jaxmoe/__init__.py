"""jaxmoe: train GLM-4.5 / GLM-4.5-Air mixture-of-experts models in JAX.

    model = jaxmoe.load_pretrained("path/to/hf_dir")      # HF Glm4MoeForCausalLM checkpoint -> Flax NNX module
    logits = model(input_ids)                             # [B, T, vocab] float32
    jaxmoe.save_pretrained(model, "out_dir")              # transformers loads it unchanged

`jaxmoe.Glm4MoeForCausalLM` is that module (jaxmoe/model/flax.py; docs/flax.md).
"""
__version__ = "0.1.0"


def load_pretrained(path, dtype="float32", **kw):
    from jaxmoe.hf import load_pretrained as _load
    return _load(path, dtype=dtype, **kw)


def save_pretrained(model, path, **kw):
    from jaxmoe.hf import save_pretrained as _save
    return _save(model, path, **kw)


def __getattr__(name):  # `import jaxmoe` stays light: flax is imported on first use
    if name in ("Glm4MoeForCausalLM", "RouterBias"):
        from jaxmoe.model import flax as _flax
        return getattr(_flax, name)
    raise AttributeError(f"module 'jaxmoe' has no attribute {name!r}")
