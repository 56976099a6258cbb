"""AdamW with Megatron's learning-rate schedule, decoupled weight decay off norms/biases, global-norm clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmoe.model.params import no_decay_names
from jaxmoe.train.args import TrainConfig

NO_DECAY = no_decay_names()  # the table's `decay=False` entries: norms and biases


def warmup_iters(t: TrainConfig, train_iters: int) -> int:
    decay = t.lr_decay_iters or train_iters
    if t.lr_warmup_fraction is not None:
        return int(t.lr_warmup_fraction * decay)
    return t.lr_warmup_iters


def lr_schedule(t: TrainConfig, train_iters: int):
    """Megatron OptimizerParamScheduler: linear warmup 0 -> lr, then cosine/linear decay to min_lr over
    lr_decay_iters, min_lr after. `step` = optimizer updates done so far (the first step uses step 0)."""
    warm = warmup_iters(t, train_iters)
    decay = max(t.lr_decay_iters or train_iters, warm + 1)
    lr, min_lr = t.lr, t.min_lr

    def sched(step):
        step = jnp.asarray(step, jnp.float32)
        ratio = jnp.clip((step - warm) / (decay - warm), 0.0, 1.0)
        if t.lr_decay_style == "cosine":
            decayed = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        elif t.lr_decay_style == "linear":
            decayed = min_lr + (1.0 - ratio) * (lr - min_lr)
        else:
            decayed = jnp.asarray(lr, jnp.float32)
        if warm > 0:
            return jnp.where(step <= warm, lr * step / warm, decayed)
        return decayed

    return sched


def decay_mask(params):
    """True where weight decay applies: matrices, not norms or biases (Megatron's default)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [str(getattr(path[-1], "key", path[-1])) for path, _ in flat]
    return jax.tree.unflatten(jax.tree.structure(params), [n not in NO_DECAY for n in names])


def make_optimizer(t: TrainConfig, train_iters: int) -> optax.GradientTransformation:
    """Clipping is done by the step itself (it needs the pre-clip norm for logging and the NaN check)."""
    return optax.adamw(lr_schedule(t, train_iters), b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_eps,
                       weight_decay=t.weight_decay, mask=decay_mask)


def clip_by_global_norm(grads, max_norm: float):
    norm = optax.global_norm(grads)
    if not max_norm:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))  # Megatron: clip_coeff = max_norm / (norm + 1e-6)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm
