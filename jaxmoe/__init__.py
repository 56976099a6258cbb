"""jaxmoe: train GLM-4.5 / GLM-4.5-Air mixture-of-experts models in JAX.

    model = jaxmoe.load_pretrained("path/to/hf_dir")      # HF Glm4MoeForCausalLM checkpoint -> Flax NNX module
    logits = model(input_ids)                             # [B, T, vocab] float32
    jaxmoe.save_pretrained(model, "out_dir")              # transformers loads it unchanged

`jaxmoe.Glm4MoeForCausalLM` is that module (jaxmoe/model/flax.py; docs/flax.md).
"""
import os
import re

__version__ = "0.1.0"
_AUTO = "JAXMOE_AUTO_PJRT_NPROC"  # marks a PJRT_NPROC that jaxmoe set (not the user)


def _reserve_host_threads(env=os.environ) -> None:
    """Fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, or JAX_NUM_CPU_DEVICES=N): give
    XLA:CPU 4 threads per device. Its pools default to N threads, enough for one collective in flight, whose
    participants block their threads until all N arrive; but XLA:CPU runs independent thunks concurrently (a
    loop holding collectives beside another collective), and with every thread blocked in one rendezvous the
    other's participants never start: the run aborts after 40 s ("Termination timeout for ... rendezvous").
    Must happen before jax creates its CPU client (it reads PJRT_NPROC then). A PJRT_NPROC / NPROC of the
    user's wins; one set here (marked, and inherited by child processes) is recomputed for this process."""
    if env.get("PJRT_NPROC") and env.get("PJRT_NPROC") == env.get(_AUTO):
        del env["PJRT_NPROC"], env[_AUTO]
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
    n = env.get("JAX_NUM_CPU_DEVICES", "")
    devices = int(found.group(1)) if found else int(n) if n.isdigit() else 0
    if devices > 1 and not env.get("PJRT_NPROC") and not env.get("NPROC"):
        env["PJRT_NPROC"] = env[_AUTO] = str(4 * devices)


_reserve_host_threads()


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
