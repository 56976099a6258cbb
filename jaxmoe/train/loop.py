"""The training job: resolve model + data, build the (sharded) train step, run, evaluate, log, checkpoint."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmoe.config import ConfigError, ModelConfig, load_model_config
from jaxmoe.convert.hf_checkpoint import TOKENIZER_FILES, read_pretrained
from jaxmoe.data.loader import SFTLoader, build_sft_data
from jaxmoe.data.pretrain import build_pretrain_loaders
from jaxmoe.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from jaxmoe.distributed import maybe_initialize
from jaxmoe.lora.train import PartialTraining
from jaxmoe.model.params import init_params, init_state
from jaxmoe.parallel.setup import build_parallel
from jaxmoe.train import checkpoint as ckpt_lib
from jaxmoe.train.args import TrainConfig
from jaxmoe.train.build import BuiltStep, build_step, micro_batches
from jaxmoe.train.logging import TrainLogger, version_aside

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "data")


def _is_hf_dir(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def _is_run_dir(path: str | None) -> bool:
    """A jaxmoe --save dir (its config.json would otherwise make it look like a HF dir)."""
    return bool(path) and (os.path.isfile(os.path.join(path, "args.json")) or bool(ckpt_lib.leftover_tmp_dirs(path)))


def resolve_model(t: TrainConfig, log=print) -> tuple[ModelConfig, str | None, str | None, int | None]:
    """-> (config, hf_dir to take weights from or None, orbax dir to resume from or None, its step)."""
    step = ckpt_lib.pick_step(t.load, log) if t.load else None  # the newest intact step
    if step is not None:  # first: a --save dir also holds a config.json
        meta = ckpt_lib.read_meta(t.load, step)
        if meta.get("weights_only") and not t.finetune:  # Glm4MoeForCausalLM.save_train_checkpoint
            raise ConfigError(f"--load {t.load}: a weights-only checkpoint (no optimizer state); add --finetune")
        return ckpt_lib.model_config_from_meta(meta), None, t.load, step
    load = t.load if _is_hf_dir(t.load) and not _is_run_dir(t.load) else None
    if t.load and load is None:  # Megatron: no checkpoint under --load -> start from scratch, same command
        if t.finetune:
            raise ConfigError(f"--load {t.load}: holds no complete checkpoint (nor a HF model) to finetune from")
        if os.path.isdir(t.load) and not _is_run_dir(t.load) and os.listdir(t.load):
            raise ConfigError(f"--load {t.load}: neither a jaxmoe checkpoint dir (<dir>/<step>/) nor a HF dir "
                              "(config.json + safetensors)")
        log(f"warning: --load {t.load} holds no complete checkpoint; starting from scratch")
    hf = load or (t.model if _is_hf_dir(t.model) else None)
    c = load_model_config(hf or t.model)
    return c, hf, None, None


def prepare_save_dir(t: TrainConfig, resume_dir: str | None, resume_step: int | None, log) -> None:
    """--save must be writable, and must not hold another run's checkpoints unless this run resumes them or
    --overwrite says to delete them. Checked before data loading and compilation."""
    try:
        os.makedirs(t.save, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=t.save, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"--save {t.save}: cannot write there ({e.strerror or e}); pass a writable dir") from None
    tmp = ckpt_lib.leftover_tmp_dirs(t.save)
    if tmp:
        log(f"> --save {t.save}: removing {len(tmp)} unfinished save(s) of a killed run: {', '.join(tmp)}")
        for name in (n for n in tmp if jax.process_index() == 0):
            shutil.rmtree(os.path.join(t.save, name))
    resumes = resume_dir is not None and not t.finetune and os.path.abspath(resume_dir) == os.path.abspath(t.save)
    steps = ckpt_lib.complete_steps(t.save)
    if resumes:  # steps newer than the one resumed failed verification: out of the way of this run's saves
        for step in (s for s in steps if s > resume_step and jax.process_index() == 0):
            dst = os.path.join(t.save, "damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(os.path.join(t.save, str(step)), dst)
            log(f"> moved the damaged checkpoint {t.save}/{step} to {dst}")
    elif steps and not t.overwrite:
        raise ConfigError(f"--save {t.save}: holds checkpoints of another run (steps {', '.join(map(str, steps))}); "
                          f"resume it with --load {t.save}, pass a new --save dir, or add --overwrite to delete them")
    elif steps:
        for step in (s for s in steps if jax.process_index() == 0):
            shutil.rmtree(os.path.join(t.save, str(step)))
        log(f"> --overwrite: deleted checkpoints {', '.join(map(str, steps))} of the earlier run in {t.save}")
    if jax.process_count() > 1:  # every process sees the directory as process 0 left it
        multihost_utils.sync_global_devices("jaxmoe_prepare_save_dir")


def write_run_files(t: TrainConfig, c: ModelConfig, hf_dir: str | None, log) -> None:
    """args.json (an earlier, different one is kept as args.N.json), config.json and the tokenizer files, so
    that orbax-to-hf and generate find everything in the --save dir."""

    args_path, args = os.path.join(t.save, "args.json"), json.loads(json.dumps(dataclasses.asdict(t), default=str))
    if os.path.isfile(args_path):
        with open(args_path) as f:
            same = json.load(f) == args
        if not same:
            log(f"> kept the earlier args.json as {os.path.basename(version_aside(args_path))}")
    ckpt_lib.dump_json(args_path, args)
    c.save_json(os.path.join(t.save, "config.json"))
    tok_src = tokenizer_dir(t, hf_dir) or TINY_TOKENIZER_DIR
    for f in (f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tok_src, f))):
        shutil.copy(os.path.join(tok_src, f), os.path.join(t.save, f))


class StopSignal:
    """SIGTERM / SIGINT ask the loop to stop after the current step (Megatron --exit_signal_handler); a second
    signal acts at once (the default action). All processes of a job stop at the same step."""

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._old = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.signum is not None
        # Every process calls this after each step: gather the flags (a few bytes, as Megatron's all_gather of
        # its signal flags each iteration), so all stop after the same step when any one was signalled. Like
        # Megatron's, the gather waits for the step just dispatched.
        flags = multihost_utils.process_allgather(np.int32(self.signum is not None))
        return bool(np.any(flags))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal on another process"

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def tokenizer_dir(t: TrainConfig, hf_dir: str | None) -> str | None:
    """--tokenizer, else the HF model dir's tokenizer, else None (the bundled tiny one)."""
    return t.tokenizer or (hf_dir if hf_dir and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None)


def build_data(t: TrainConfig, c: ModelConfig, hf_dir: str | None, shard_index: int, shard_count: int, log):

    tok = load_tokenizer(tokenizer_dir(t, hf_dir))
    if len(tok) > c.vocab_size:
        raise ConfigError(f"tokenizer has {len(tok)} ids but the model's vocab_size is {c.vocab_size}; pass the "
                          "--tokenizer that belongs to --model")
    if t.task == "pt":
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


def overflow_guarded(built, train_iters: int, log):
    """built.step, or with a bounded dropless expert-parallel buffer (--moe_dispatch_buffer_factor) a step that
    re-runs every step whose buffer overflowed (it left the train state unchanged, train/step.py) with
    worst-case buffers, compiled on the first overflow. The overflow count is read on the host after each step."""
    if not getattr(built.par.dispatch, "bounded", False):
        return built.step
    fallback = []

    def step(ts, batch, frozen=None):
        ts, m = built.step(ts, batch, frozen)
        over = int(m["moe_overflow"])
        if not over:
            return ts, m
        if not fallback:
            log(f"warning: {over} token copies overflowed the expert-parallel buffers (--moe_dispatch_buffer_factor "
                f"{built.t.moe_dispatch_buffer_factor}); such steps re-run with worst-case buffers (compiling them "
                "now); raise --moe_dispatch_buffer_factor if this repeats")
            par = dataclasses.replace(built.par, dispatch=built.par.dispatch.worst_case())
            fallback.append(build_step(built.t, built.c, par, train_iters, built.ptrain).step)
        ts, m = fallback[0](ts, batch, frozen)
        return ts, {**m, "moe_overflow": over}

    return step


def run(t: TrainConfig, stream=None) -> dict[str, Any]:
    """Run the job described by `t`; returns the last logged metrics (for tests and scripts)."""
    t.validate()
    maybe_initialize(t)  # join the other processes of a multi-host job before anything touches a device
    is_main = jax.process_index() == 0
    lines: list[str] = []

    def log(msg):
        lines.append(msg)
        if is_main:
            print(msg, file=stream, flush=True)

    stop = StopSignal(t.exit_signal_handler)  # from here on a SIGTERM stops cleanly after the next step
    try:
        return _run(t, stream, is_main, log, stop)
    finally:
        stop.restore()


def check_job(t: TrainConfig, log) -> tuple[ModelConfig, str | None, str | None, int | None]:
    """resolve_model plus the checks that need the model config; prepares --save. Before data and compiles."""
    c, hf_dir, resume_dir, resume_step = resolve_model(t, log)
    if t.save:
        prepare_save_dir(t, resume_dir, resume_step, log)
    if resume_dir and t.train_type == "lora" and _is_hf_dir(t.model):
        hf_dir = t.model  # a LoRA checkpoint holds adapters only: the frozen base comes from --model again
    if resume_dir and t.train_type == "lora" and load_model_config(t.model).to_hf_dict() != c.to_hf_dict():
        raise ConfigError(f"--load {t.load}: its adapters belong to another base model than --model {t.model}; pass "
                          "the --model the LoRA run was trained on")
    if t.mtp_num_layers is not None and t.mtp_num_layers > c.num_nextn_predict_layers:
        raise ConfigError(f"--mtp_num_layers {t.mtp_num_layers}: the model has only {c.num_nextn_predict_layers} "
                          "MTP layers")
    return c, hf_dir, resume_dir, resume_step


@dataclasses.dataclass
class LoopState:
    """What the loop advances: the train state, the frozen base (LoRA / partial training, else None), the
    iteration and the samples consumed."""
    ts: dict
    frozen: Any
    iteration: int = 0
    consumed: int = 0


def initial_state(built: BuiltStep, hf_dir: str | None, log) -> LoopState:
    """The train state from HF weights or a fresh init (full training: fp32 masters in the ZeRO layout;
    partial training: the frozen base in the compute dtype, the trainable part in the train state)."""
    t, c, par, ptrain = built.t, built.c, built.par, built.ptrain
    # full training: fp32 masters; partial training: the frozen base lives in the compute dtype only
    dtype, shardings = ("float32", par.master_shardings) if ptrain is None else (t.dtype, par.param_shardings)
    if hf_dir:
        _, params, mstate, _ = read_pretrained(hf_dir, dtype, shardings)
        log(f"> loaded weights from HF dir {hf_dir}")
    else:
        params = jax.jit(lambda k: init_params(c, k, dtype), out_shardings=shardings)(jax.random.key(t.seed))
        mstate = init_state(c)
    mstate = jax.device_put(mstate, par.replicated)
    if ptrain is None:
        return LoopState(par.init_train_state(params, mstate, built.optimizer), None)
    return LoopState(ptrain.init_train_state(params, mstate, built.optimizer, par), par.stage_frozen(params))


def build_state(built: BuiltStep, hf_dir: str | None, resume_dir: str | None, resume_step: int | None, train,
                log) -> LoopState:
    """The initial state, then (with --load) the checkpoint restored into it: all of it, or with --finetune
    the weights only, starting at iteration 0. Resuming also puts the train loader where it stopped."""
    t = built.t
    whole = resume_dir and not t.finetune and built.ptrain is None
    # a full-training resume restores the whole state: an initial one would only hold a second copy of it
    st = LoopState(None, None) if whole else initial_state(built, hf_dir, log)
    if not resume_dir:
        if built.ptrain is not None and t.adapter_load:
            st.ts = built.ptrain.load_adapters(t.adapter_load, st.ts, built.par)
            log(f"> adapters from {t.adapter_load}")
        return st
    # checkpoints hold the canonical layout (Parallel.to_checkpoint)
    abstract = built.abstract_state(canonical=True) if built.ptrain is None else ckpt_lib.abstract_like(st.ts)
    if t.finetune:
        part = {"params": abstract["params"], "model_state": abstract["model_state"]}
        got, _, meta = ckpt_lib.restore(resume_dir, part, step=resume_step, partial=True)
        st.ts = {**st.ts, **built.to_storage(got)}
        log(f"> finetune: weights from {resume_dir} (iteration {meta['iteration']}), starting at step 0")
        return st
    state, data_state, meta = ckpt_lib.restore(resume_dir, abstract, step=resume_step)
    st.ts = built.to_storage(state)
    st.iteration, st.consumed = int(meta["iteration"]), int(meta["consumed_samples"])
    if data_state is not None:
        train.set_state(data_state)
    elif not t.no_load_data_state:
        raise ConfigError(f"--load {resume_dir}: step {resume_step} has no data-loader state (data/); pass "
                          "--no_load_data_state to resume with the data order restarted from the beginning")
    else:
        log("warning: --no_load_data_state: the data order restarts from the beginning")
    log(f"> resumed from {resume_dir} at iteration {st.iteration}")
    return st


@dataclasses.dataclass
class Job:
    """The pieces of one training job the loop works with (built once by `_run`)."""
    built: BuiltStep
    train: Any  # the train loader
    valid: Any  # the validation loader or None
    train_iters: int
    logger: Any  # train.logging.TrainLogger
    ckpt: ckpt_lib.Checkpointer | None
    stop: StopSignal


def make_logger(t: TrainConfig, train_iters: int, start_iteration: int, stream, is_main: bool):
    tb = t.tensorboard_dir or (os.path.join(t.save, "runs") if t.save else None)
    return TrainLogger(t.save if is_main else None, train_iters, log_interval=t.log_interval,
                       tensorboard_dir=tb if is_main else None, start_iteration=start_iteration,
                       **({"stream": stream if is_main else open(os.devnull, "w")}
                          if stream is not None or not is_main else {}))  # text on process 0 only


def log_job(job: Job, st: LoopState) -> None:
    """The run's opening lines: trained / total parameters, mesh, iterations, micro-batches, pipeline."""
    t, par, ptrain, info = job.built.t, job.built.par, job.built.ptrain, job.logger.info
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(par.param_shapes))
    if ptrain is not None:
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st.ts["params"]))
        info(f"> {t.train_type}: training {n_train / 1e6:.3f}M params ({100 * n_train / n_params:.3f}%)"
             f"{'' if ptrain.lc is None else f', LoRA r={ptrain.lc.rank} on {list(ptrain.lc.units())}'}, "
             f"extras {ptrain.extra_paths or 'none'}")
    num_micro = job.built.num_micro
    info(f"> model: {n_params / 1e6:.2f}M params, mesh {par.describe()}, {job.train_iters} iterations, "
         f"{num_micro} micro-batch(es) of {t.micro_batch_size} per data rank")
    if par.pipeline is not None:
        S = par.pipeline.stages
        info(f"> pipeline: {S} stages, MoE layers per stage {par.pipeline.describe()}, GPipe over "
             f"{num_micro + S - 1} iterations (bubble {(S - 1) / (num_micro + S - 1):.0%}"
             f"{'; use more micro-batches than stages' if num_micro < S else ''})")


def save_checkpoint(job: Job, st: LoopState) -> None:
    if job.ckpt is None:
        return
    t, ptrain = job.built.t, job.built.ptrain
    saved = {k: v for k, v in st.ts.items() if not (t.no_save_optim and k == "opt_state")}
    saved = job.built.to_checkpoint(saved, "pinned_host")  # canonical copies on the host: no device room needed
    job.ckpt.save(st.iteration, saved, job.train.get_state(), ckpt_lib.make_meta(
        job.built.c, t, st.iteration, st.consumed, {"partial": ptrain.meta()} if ptrain else None))


class MetricsLog:
    """Logs each step's metrics one step late, so the host fetches step i's numbers while step i+1 runs;
    stops the run after --max_skipped_iters non-finite steps in a row. `last` = the last logged metrics."""

    def __init__(self, t: TrainConfig, logger):
        self.t, self.logger, self.last, self.pending, self.t_last = t, logger, {}, None, time.perf_counter()

    def push(self, iteration: int, metrics) -> None:
        self.flush()
        self.pending = (iteration, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        (it, mdev), self.pending, t = self.pending, None, self.t
        m = _host(mdev)
        now = time.perf_counter()
        elapsed, self.t_last = now - self.t_last, now
        m.update(consumed_samples=it * t.global_batch_size, elapsed_ms=1000 * elapsed,
                 global_batch_size=t.global_batch_size, nan_iters=int(m["skipped_iters"]),
                 tokens_per_sec=float(m["tokens"]) / max(elapsed, 1e-9), num_devices=jax.device_count())
        self.logger.log_train(it, m)
        self.last = m
        if int(m["nan_in_a_row"]) >= t.max_skipped_iters:
            raise FloatingPointError(f"iteration {it}: {int(m['nan_in_a_row'])} non-finite steps in a row "
                                     f"(--max_skipped_iters {t.max_skipped_iters}); lower --lr or check the data")


def train_loop(job: Job, st: LoopState) -> dict[str, Any]:
    """Step until train_iters, --exit_interval or a stop signal; evaluate and save on their intervals.
    Returns the last logged metrics (plus valid_loss after an evaluation)."""
    t, b, logger = job.built.t, job.built, job.logger
    metrics = MetricsLog(t, logger)
    step = overflow_guarded(b, job.train_iters, logger.info)
    signalled = job.stop.requested()
    if signalled:
        logger.info(f"> received {job.stop.name} before the first step: nothing trained, nothing saved")
    while st.iteration < job.train_iters and not signalled:
        st.ts, m = step(st.ts, b.par.put_batch(next(job.train)), st.frozen)
        st.iteration, st.consumed = st.iteration + 1, st.consumed + t.global_batch_size
        if job.ckpt is not None:
            job.ckpt.check()
        metrics.push(st.iteration, m)
        if job.valid is not None and (st.iteration % t.eval_interval == 0 or st.iteration == job.train_iters):
            metrics.flush()
            loss = evaluate(b.eval, st.ts, job.valid, t.eval_iters, b.par.put_batch, st.frozen)
            logger.log_validation(st.iteration, loss)
            metrics.last["valid_loss"] = loss
        exit_now = bool(t.exit_interval) and st.iteration % t.exit_interval == 0
        signalled = job.stop.requested()
        if st.iteration % t.save_interval == 0 or st.iteration == job.train_iters or exit_now or signalled:
            save_checkpoint(job, st)
        if exit_now:
            logger.info(f"> exiting at iteration {st.iteration} (--exit_interval {t.exit_interval})")
            break
        if signalled:
            metrics.flush()
            report_stop(job, st)
            break
    metrics.flush()
    return metrics.last


def report_stop(job: Job, st: LoopState) -> None:
    if job.ckpt is not None:
        job.ckpt.wait()  # the checkpoint is complete before the message says so
    save = job.built.t.save
    where = f"saved {save}/{st.iteration}; resume with --load {save}" if job.ckpt else "no --save, nothing saved"
    job.logger.info(f"> received {job.stop.name}: stopped at iteration {st.iteration}, {where}")


def _run(t: TrainConfig, stream, is_main: bool, log, stop: StopSignal) -> dict[str, Any]:
    c, hf_dir, resume_dir, resume_step = check_job(t, log)
    par = build_parallel(t, c)  # validates the mesh before anything is compiled
    micro_batches(t, par)
    ptrain = PartialTraining.from_train_config(t, c)  # LoRA / frozen parameters: train state = trainable part only
    # Each process loads only the rows of every global batch that its own devices hold.
    train, valid = build_data(t, c, hf_dir, *par.process_batch_shard(), log)
    train_iters = t.train_iters or (t.max_epochs or 1) * train.steps_per_epoch
    built = build_step(t, c, par, train_iters, ptrain)
    st = build_state(built, hf_dir, resume_dir, resume_step, train, log)

    logger = make_logger(t, train_iters, st.iteration, stream, is_main)
    ckpt = ckpt_lib.Checkpointer(t.save, t.save_total_limit, t.async_save) if t.save else None
    job = Job(built, train, valid, train_iters, logger, ckpt, stop)
    try:
        if t.save and is_main:
            write_run_files(t, c, hf_dir, logger.info)
        log_job(job, st)
        last = train_loop(job, st)
    finally:
        try:
            if ckpt is not None:
                ckpt.close()
        finally:
            logger.close()
    last["iteration"] = st.iteration
    last["ppl"] = math.exp(min(20.0, float(last.get("lm_loss", 0.0))))
    return last
