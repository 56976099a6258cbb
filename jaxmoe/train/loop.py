"""The training job: resolve model + data, build the (sharded) train step, run, evaluate, log, checkpoint."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig, load_model_config
from jaxmoe.model.options import ModelOptions
from jaxmoe.model.params import init_params, init_state
from jaxmoe.train import checkpoint as ckpt_lib
from jaxmoe.train.args import TrainConfig
from jaxmoe.train.loss import LossOptions
from jaxmoe.train.optimizer import lr_schedule, make_optimizer
from jaxmoe.train.step import init_train_state, make_eval_step, make_train_step

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "data")


def _is_hf_dir(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def resolve_model(t: TrainConfig) -> tuple[ModelConfig, str | None, str | None]:
    """-> (config, hf_dir to take weights from or None, orbax dir to resume from or None)."""
    if t.load and ckpt_lib.is_checkpoint_dir(t.load):  # first: a --save dir also holds a config.json
        meta = ckpt_lib.read_meta(t.load)
        if meta.get("weights_only") and not t.finetune:  # Glm4MoeForCausalLM.save_train_checkpoint
            raise ConfigError(f"--load {t.load}: a weights-only checkpoint (no optimizer state); add --finetune")
        return ckpt_lib.model_config_from_meta(meta), None, t.load
    if t.load and not _is_hf_dir(t.load):
        raise ConfigError(f"--load {t.load}: neither a jaxmoe checkpoint dir (<dir>/<step>/) nor a HF dir "
                          "(config.json + safetensors)")
    hf = t.load if _is_hf_dir(t.load) else (t.model if _is_hf_dir(t.model) else None)
    c = load_model_config(hf or t.model)
    return c, hf, None


def model_options(t: TrainConfig) -> ModelOptions:
    remat = t.recompute_granularity or "none"
    kernels = t.kernels
    if kernels == "auto" and jax.default_backend() == "cpu":
        kernels = "reference"  # Pallas kernels run in interpret mode only, far too slow for training on CPU
    return ModelOptions(compute_dtype=t.dtype, kernels=kernels, remat=remat,
                        remat_modules=tuple(t.recompute_modules))


def build_data(t: TrainConfig, c: ModelConfig, hf_dir: str | None, shard_index: int, shard_count: int, log):
    from jaxmoe.data.loader import SFTLoader, build_sft_data
    from jaxmoe.data.tokenizer import load_tokenizer

    tok_dir = t.tokenizer or (hf_dir if hf_dir and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None)
    tok = load_tokenizer(tok_dir)
    if len(tok) > c.vocab_size:
        raise ConfigError(f"tokenizer has {len(tok)} ids but the model's vocab_size is {c.vocab_size}; pass the "
                          "--tokenizer that belongs to --model")
    if t.task == "pt":
        from jaxmoe.data.pretrain import build_pretrain_loaders
        return build_pretrain_loaders(t, tok, shard_index, shard_count, log)
    paths = t.dataset or [os.path.join(BUNDLED, "sft_tiny.jsonl")]
    train_rows, valid_rows, stats = build_sft_data(paths, tok, t.max_length, t.packing, t.truncation_strategy,
                                                   t.split_dataset_ratio, t.seed, t.dataset_num_proc)
    for split in ("train", "valid"):
        s = stats[split]
        dropped = ", ".join(f"{k}: {v}" for k, v in s.get("dropped", {}).items() if v) or "none"
        log(f"> {split} data: {s.get('samples', 0)} samples -> {s.get('packed_rows', 0)} rows of {t.max_length} "
            f"tokens (fill {s.get('fill', 0):.1%}), {s.get('loss_tokens', 0)} loss tokens; dropped: {dropped}")
    train = SFTLoader(train_rows, t.global_batch_size, t.seed, shard_index=shard_index, shard_count=shard_count)
    valid = None
    if valid_rows["input_ids"].shape[0]:
        valid = SFTLoader(valid_rows, t.global_batch_size, t.seed, shuffle=False, shard_index=shard_index,
                          shard_count=shard_count, drop_remainder=False)
    return train, valid


def _host(x):
    return jax.tree.map(lambda a: np.asarray(a), jax.device_get(x))


def evaluate(eval_fn, ts, valid, iters: int, put, frozen=None) -> float:
    state = valid.get_state()
    nll, tok = 0.0, 0.0
    valid.set_state({**state, "step": 0})  # every evaluation sees the same batches
    for _ in range(min(iters, valid.steps_per_epoch)):
        n, k = eval_fn(ts["params"], ts["model_state"], put(next(valid)), frozen)
        nll, tok = nll + float(n), tok + float(k)
    valid.set_state(state)
    return nll / max(tok, 1.0)


def run(t: TrainConfig, stream=None) -> dict[str, Any]:
    """Run the job described by `t`; returns the last logged metrics (for tests and scripts)."""
    from jaxmoe.parallel.setup import build_parallel
    from jaxmoe.train.logging import TrainLogger

    t.validate()
    from jaxmoe.distributed import maybe_initialize
    maybe_initialize(t)  # join the other processes of a multi-host job before anything touches a device
    c, hf_dir, resume_dir = resolve_model(t)
    if resume_dir and t.train_type == "lora" and _is_hf_dir(t.model):
        hf_dir = t.model  # a LoRA checkpoint holds adapters only: the frozen base comes from --model again
    if resume_dir and t.train_type == "lora" and load_model_config(t.model).to_hf_dict() != c.to_hf_dict():
        raise ConfigError(f"--load {t.load}: its adapters belong to another base model than --model {t.model}; pass "
                          "the --model the LoRA run was trained on")
    if t.mtp_num_layers is not None and t.mtp_num_layers > c.num_nextn_predict_layers:
        raise ConfigError(f"--mtp_num_layers {t.mtp_num_layers}: the model has only {c.num_nextn_predict_layers} "
                          "MTP layers")
    par = build_parallel(t, c)  # validates the mesh before anything is compiled
    opts = model_options(t)
    from jaxmoe.lora.train import PartialTraining
    ptrain = PartialTraining.from_train_config(t, c)  # LoRA / frozen parameters: train state = trainable part only
    is_main = jax.process_index() == 0
    logger_save = t.save if is_main else None
    lines: list[str] = []

    def log(msg):
        lines.append(msg)
        if is_main:
            print(msg, file=stream, flush=True)

    # Each process loads only the rows of every global batch that its own devices hold.
    train, valid = build_data(t, c, hf_dir, *par.process_batch_shard(), log)
    train_iters = t.train_iters or (t.max_epochs or 1) * train.steps_per_epoch
    optimizer = make_optimizer(t, train_iters)
    schedule = lr_schedule(t, train_iters)
    num_micro = t.global_batch_size // (t.micro_batch_size * par.data_parallel_size)
    if num_micro * t.micro_batch_size * par.data_parallel_size != t.global_batch_size:
        raise ConfigError(f"--global_batch_size {t.global_batch_size} must be a multiple of --micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({par.data_parallel_size})")
    mtp_layers = c.num_nextn_predict_layers if t.mtp_num_layers is None else t.mtp_num_layers
    lo = LossOptions(mtp_layers=mtp_layers, mtp_scale=t.mtp_loss_scaling_factor, aux_coeff=t.moe_aux_loss_coeff)

    # ---- state: init, HF weights, or checkpoint ---------------------------------------------------------
    iteration, consumed = 0, 0
    if hf_dir:
        from jaxmoe.hf import load_pretrained
        m = load_pretrained(hf_dir, dtype="float32" if ptrain is None else t.dtype,
                            shardings=par.master_shardings if ptrain is None else par.param_shardings)
        params, mstate = m.params, jax.device_put(m.state, par.replicated)
        log(f"> loaded weights from HF dir {hf_dir}")
    elif ptrain is None:
        params = jax.jit(lambda k: init_params(c, k), out_shardings=par.master_shardings)(jax.random.key(t.seed))
        mstate = jax.device_put(init_state(c), par.replicated)
    else:  # the frozen base lives in the compute dtype only
        params = jax.jit(lambda k: init_params(c, k, t.dtype), out_shardings=par.param_shardings)(
            jax.random.key(t.seed))
        mstate = jax.device_put(init_state(c), par.replicated)
    frozen = None
    if ptrain is None:
        ts = jax.jit(lambda p, s: init_train_state(p, s, optimizer), out_shardings=par.state_shardings(optimizer))(
            params, mstate)
    else:
        ts, frozen = ptrain.init_train_state(params, mstate, optimizer, par), params
        if t.adapter_load and not resume_dir:
            ts = ptrain.load_adapters(t.adapter_load, ts, par)
            log(f"> adapters from {t.adapter_load}")
    if resume_dir:
        abstract = ckpt_lib.abstract_like(ts)
        if t.finetune:
            part = {"params": abstract["params"], "model_state": abstract["model_state"]}
            got, _, meta = ckpt_lib.restore(resume_dir, part, partial=True)
            ts = {**ts, **got}
            log(f"> finetune: weights from {resume_dir} (iteration {meta['iteration']}), starting at step 0")
        else:
            ts, data_state, meta = ckpt_lib.restore(resume_dir, abstract)
            iteration, consumed = int(meta["iteration"]), int(meta["consumed_samples"])
            if data_state is not None:
                train.set_state(data_state)
            log(f"> resumed from {resume_dir} at iteration {iteration}")

    hooks = par.step_hooks()
    combine_eval = None
    if ptrain is not None:
        cp, gt, combine, combine_eval = ptrain.make_hooks(par)
        hooks.update(compute_params=cp, grad_transform=gt, combine=combine,
                     param_shardings=ptrain.compute_shardings(par), frozen_shardings=par.param_shardings)
    bias_rate = t.moe_router_bias_update_rate if t.train_type == "full" else 0.0  # frozen under LoRA
    step_fn = jax.jit(make_train_step(c, opts, lo, optimizer, schedule, num_micro, t.clip_grad, bias_rate,
                                      **hooks), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(c, opts, dispatch=par.dispatch, combine=combine_eval, par=par,
                                     num_micro=num_micro))
    put = par.put_batch

    tb = t.tensorboard_dir or (os.path.join(t.save, "runs") if t.save else None)
    logger = TrainLogger(logger_save, train_iters, log_interval=t.log_interval,
                         tensorboard_dir=tb if is_main else None, start_iteration=iteration,
                         **({"stream": stream if is_main else open(os.devnull, "w")}
                            if stream is not None or not is_main else {}))  # text on process 0 only
    ckpt = ckpt_lib.Checkpointer(t.save, t.save_total_limit, t.async_save) if t.save else None
    if t.save and is_main:
        os.makedirs(t.save, exist_ok=True)
        ckpt_lib.dump_json(os.path.join(t.save, "args.json"), dataclasses.asdict(t))
        c.save_json(os.path.join(t.save, "config.json"))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen if ptrain else ts["params"]))
    if ptrain is not None:
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts["params"]))
        logger.info(f"> {t.train_type}: training {n_train / 1e6:.3f}M params ({100 * n_train / n_params:.3f}%)"
                    f"{'' if ptrain.lc is None else f', LoRA r={ptrain.lc.rank} on {list(ptrain.lc.units())}'}, "
                    f"extras {ptrain.extra_paths or 'none'}")
    logger.info(f"> model: {n_params / 1e6:.2f}M params, mesh {par.describe()}, {train_iters} iterations, "
                f"{num_micro} micro-batch(es) of {t.micro_batch_size} per data rank")
    if par.pipeline is not None:
        S = par.pipeline.stages
        logger.info(f"> pipeline: {S} stages, MoE layers per stage {par.pipeline.describe()}, GPipe over "
                    f"{num_micro + S - 1} iterations (bubble {(S - 1) / (num_micro + S - 1):.0%}"
                    f"{'; use more micro-batches than stages' if num_micro < S else ''})")

    def save(it):
        if ckpt is None:
            return
        saved = {k: v for k, v in ts.items() if not (t.no_save_optim and k == "opt_state")}
        ckpt.save(it, saved, train.get_state(),
                  ckpt_lib.make_meta(c, t, it, consumed, {"partial": ptrain.meta()} if ptrain else None))

    last: dict[str, Any] = {}
    pending = None
    t_last = time.perf_counter()

    def flush(p):
        nonlocal t_last, last
        it, mdev = p
        m = _host(mdev)
        now = time.perf_counter()
        elapsed = now - t_last
        t_last = now
        m.update(consumed_samples=it * t.global_batch_size, elapsed_ms=1000 * elapsed,
                 global_batch_size=t.global_batch_size, nan_iters=int(m["skipped_iters"]),
                 tokens_per_sec=float(m["tokens"]) / max(elapsed, 1e-9), num_devices=jax.device_count())
        logger.log_train(it, m)
        last = m
        if int(m["nan_in_a_row"]) >= t.max_skipped_iters:
            raise FloatingPointError(f"iteration {it}: {int(m['nan_in_a_row'])} non-finite steps in a row "
                                     f"(--max_skipped_iters {t.max_skipped_iters}); lower --lr or check the data")

    ctx = par.context()
    ctx.__enter__()  # logical-axis sharding constraints apply while the steps trace
    try:
        while iteration < train_iters:
            batch = put(next(train))
            ts, metrics = step_fn(ts, batch, frozen)
            iteration += 1
            consumed += t.global_batch_size
            if pending is not None:
                flush(pending)  # the previous step's metrics: fetched while this step runs
            pending = (iteration, metrics)
            if valid is not None and (iteration % t.eval_interval == 0 or iteration == train_iters):
                flush(pending)
                pending = None
                loss = evaluate(eval_fn, ts, valid, t.eval_iters, put, frozen)
                logger.log_validation(iteration, loss)
                last["valid_loss"] = loss
            stop = bool(t.exit_interval) and iteration % t.exit_interval == 0
            if iteration % t.save_interval == 0 or iteration == train_iters or stop:
                save(iteration)
            if stop:
                logger.info(f"> exiting at iteration {iteration} (--exit_interval {t.exit_interval})")
                break
        if pending is not None:
            flush(pending)
    finally:
        ctx.__exit__(None, None, None)
        if ckpt is not None:
            ckpt.close()
        logger.close()
    last["iteration"] = iteration
    last["ppl"] = math.exp(min(20.0, float(last.get("lm_loss", 0.0))))
    return last
