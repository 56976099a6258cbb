"""Training configuration: one dataclass, filled from a YAML file then from Megatron-SWIFT-named flags.

Every field is a flag (`--lr 1e-4`, `--packing true`, `--dataset a.jsonl b.jsonl`); `--help` prints each
one's help text. Validation runs before anything is compiled or loaded and names the flag to fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, get_type_hints

import yaml

from jaxmoe.config import ConfigError


def _f(default, help: str, **kw):
    if default is list:
        return dataclasses.field(default_factory=list, metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    # ---- model / data ------------------------------------------------------------------------------------
    model: str = _f("tiny", "HF checkpoint dir (config.json + safetensors) or a preset: tiny, glm4.5-air, glm4.5. "
                            "A preset starts from random weights.")
    tokenizer: str | None = _f(None, "HF tokenizer dir; default: the --model dir's tokenizer, else the bundled tiny one.")
    train_type: str = _f("full", "full: train all weights; lora: train low-rank adapters over a frozen base "
                                 "(docs/lora.md).", choices=("full", "lora"))
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: int = _f(32, "LoRA alpha; adapters are scaled by alpha/r (alpha/sqrt(r) with --use_rslora).")
    lora_dropout: float = _f(0.05, "Dropout on the adapter input.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"], metadata={
        "help": "LoRA targets: all-linear (attention, dense MLP, shared and routed experts; not the router) or "
                "Megatron names linear_qkv linear_proj linear_fc1 linear_fc2 (qkv proj fc1 fc2), HF names q_proj "
                "k_proj v_proj o_proj gate_proj up_proj down_proj experts shared_experts, and eh_proj (MTP)."})
    modules_to_save: list[str] = _f(list, "Base weights trained fully alongside LoRA (embed, lm_head, final_norm "
                                          "or a jaxmoe param path such as moe/attn_norm).")
    trainable_parameters: list[str] = _f(list, "Regexes over jaxmoe param paths (e.g. 'moe/wq', 'norm$') trained "
                                               "fully alongside the adapters.")
    freeze_parameters: list[str] = _f(list, "Regexes over jaxmoe param paths to freeze (full training: train "
                                            "the rest; LoRA: remove from the trained extras).")
    adapter_load: str | None = _f(None, "Start LoRA training from the adapters of a jaxmoe LoRA checkpoint dir "
                                        "(step 0, fresh optimizer).")
    task: str = _f("sft", "sft: chat data with loss on assistant turns; pt: pretraining on plain text / "
                          "Megatron indexed data (loss on every token).", choices=("sft", "pt"))
    dataset: list[str] = _f(list, "One or more jsonl files (sft: `messages` rows; pt: `text` rows). Default: the "
                                  "bundled tiny dataset of the task.")
    data_path: list[str] = _f(list, "pt: Megatron indexed dataset prefixes, optionally weighted: `0.3 a 0.7 b` "
                                    "(a.bin/a.idx from `python -m jaxmoe.data.preprocess`).")
    split: str = _f("969,30,1", "pt: train/valid/test split weights over documents (Megatron --split).")
    data_cache_path: str | None = _f(None, "pt: where sample-index caches are written (default: next to the data).")
    eod_mask_loss: bool = _f(False, "pt: no loss on end-of-document tokens (Megatron --eod_mask_loss).")
    max_length: int = _f(512, "Tokens per packed row / per sample (Megatron --seq_length).")
    packing: bool = _f(True, "Pack several samples per row (padding-free, attention never crosses samples).")
    truncation_strategy: str = _f("delete", "Samples longer than max_length: delete (drop and count), left, right "
                                            "(cut that side), raise (stop with file:line).",
                                  choices=("delete", "left", "right", "raise"))
    split_dataset_ratio: float = _f(0.1, "Fraction of rows held out for validation (0 disables validation).")
    dataset_num_proc: int = _f(1, "Processes used to tokenize the dataset.")
    # ---- batch / schedule --------------------------------------------------------------------------------
    micro_batch_size: int = _f(1, "Rows per micro-batch per data-parallel rank.")
    global_batch_size: int = _f(8, "Rows per optimizer step; global/(micro*dp) micro-batches are accumulated.")
    train_iters: int | None = _f(None, "Optimizer steps to run (default: from --max_epochs).")
    max_epochs: int | None = _f(None, "Epochs to run when --train_iters is not given (default 1).")
    lr: float = _f(1e-4, "Peak learning rate.")
    min_lr: float = _f(1e-5, "Learning rate at the end of decay.")
    lr_decay_style: str = _f("cosine", "cosine | linear | constant.", choices=("cosine", "linear", "constant"))
    lr_decay_iters: int | None = _f(None, "Steps over which the lr decays (default: train_iters).")
    lr_warmup_iters: int = _f(0, "Linear warmup steps from 0 to --lr.")
    lr_warmup_fraction: float | None = _f(0.05, "Warmup as a fraction of decay steps (overrides --lr_warmup_iters).")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not on norms and biases).")
    clip_grad: float = _f(1.0, "Clip gradients to this global norm (0 disables).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    seed: int = _f(42, "Seed of weight init, data order and dropout.")
    # ---- MoE / MTP ---------------------------------------------------------------------------------------
    moe_aux_loss_coeff: float = _f(0.0, "Megatron load-balancing aux loss coefficient (0 = off).")
    moe_router_bias_update_rate: float = _f(1e-3, "Loss-free balancing: correction bias += rate*sign(mean-load) "
                                                   "per step (0 = frozen bias).")
    mtp_num_layers: int | None = _f(None, "Train the first N MTP layers (default: all the model has; 0 = off).")
    mtp_loss_scaling_factor: float = _f(0.1, "Weight of the MTP loss.")
    # ---- compute -----------------------------------------------------------------------------------------
    mesh: str = _f("", "Parallel layout, e.g. tp=4,ep=4,pp=2: dp data, tp tensor, ep expert, pp pipeline stages, "
                       "cp context (dp = remaining devices; docs/parallelism.md).")
    decoder_first_pipeline_num_layers: int | None = _f(
        None, "With pp > 1: decoder layers on the first stage, dense layers included (Megatron flag); the middle "
              "stages share the rest evenly. Default: the MoE layers spread as evenly as possible.")
    decoder_last_pipeline_num_layers: int | None = _f(None, "With pp > 1: decoder layers on the last stage "
                                                            "(Megatron flag).")
    # Megatron's parallel sizes (the long form of --mesh; docs/parallelism.md "Megatron's parallel flags")
    tensor_model_parallel_size: int | None = _f(None, "Tensor parallel size tp (Megatron flag; devices = tp x pp "
                                                      "x cp x dp). Use these flags or --mesh, not both.")
    pipeline_model_parallel_size: int | None = _f(None, "Pipeline stages pp (Megatron flag).")
    context_parallel_size: int | None = _f(None, "Context parallel size cp (Megatron flag).")
    expert_model_parallel_size: int | None = _f(
        None, "Expert parallel size ep (Megatron flag): inside MoE layers the tp x cp x dp ranks regroup as etp x "
              "ep x edp (MoE parallel folding), so ep needs no extra devices; ep must divide dp, or be tp, cp or "
              "cp x tp times a divisor of dp.")
    expert_tensor_parallel_size: int | None = _f(None, "Tensor parallel size inside each routed expert (Megatron "
                                                       "flag): 1 (default, as ms-swift) or tp (each expert's FFN "
                                                       "split over the tensor ranks; ep then comes from cp x dp).")
    use_distributed_optimizer: bool = _f(True, "Accepted for Megatron-SWIFT compatibility: jaxmoe always shards "
                                               "fp32 master weights and Adam moments over every replica axis "
                                               "(ZeRO-1).")
    sequence_parallel: bool = _f(False, "Shard activations between blocks over the tensor axis too (Megatron "
                                        "--sequence_parallel); needs --max_length divisible by tp.")
    moe_transport: str = _f("auto", "Expert-parallel token exchange: auto (ragged on GPU, all_to_all on CPU), "
                                    "all_to_all (padded buffers), ragged (jax.lax.ragged_all_to_all, GPU only).",
                            choices=("auto", "all_to_all", "ragged"))
    moe_expert_capacity_factor: float | None = _f(None, "Per-expert capacity factor (Megatron flag): each expert "
                                                        "keeps at most ceil(tokens * topk / experts * factor) "
                                                        "token copies per device; the rest are dropped and counted "
                                                        "(`dropped token copies` on the log line). Default: "
                                                        "dropless.")
    moe_pad_expert_input_to_capacity: bool = _f(False, "With --moe_expert_capacity_factor (Megatron flag): every "
                                                       "expert's input is padded to its capacity, so the expert "
                                                       "exchange moves whole fixed-size buffers (the all_to_all "
                                                       "transport) instead of only the real rows (ragged).")
    moe_token_drop_policy: str = _f("probs", "With a capacity factor: drop the lowest-probability copies "
                                             "(probs) or the last ones (position).", choices=("probs", "position"))
    moe_dispatch_buffer_factor: float | None = _f(
        None, "Dropless expert parallelism: each device's send buffer per expert-parallel peer holds "
              "ceil(F * tokens * topk / ep) token copies instead of the worst case tokens * topk (ep times the "
              "balanced load). A step in which some device routes more copies to one peer is not applied; the "
              "trainer re-runs it with worst-case buffers (compiled once, with a warning) and logs the overflow. "
              "Default: the worst case (as F >= ep). Ignored with --moe_expert_capacity_factor. docs/performance.md "
              "has memory numbers (GLM-4.5-Air LoRA, ep=8: F=2 saves 19 GiB per GPU).")
    dtype: str = _f("bfloat16", "Compute dtype (master weights and optimizer state are fp32).",
                    choices=("bfloat16", "float32"))
    kernels: str = _f("auto", "auto | pallas | reference, or per op: attention=pallas,gmm=reference,...")
    recompute_granularity: str | None = _f(None, "full | selective activation recomputation (default: none).",
                                           choices=(None, "full", "selective"))
    recompute_modules: list[str] = _f(list, "Selective recompute targets: core_attn, moe_out, mlp.")
    max_skipped_iters: int = _f(10, "Abort after this many non-finite (NaN/Inf) steps in a row.")
    # ---- eval / checkpoints / logs -----------------------------------------------------------------------
    eval_interval: int = _f(200, "Validate every N steps (and at the end).")
    eval_iters: int = _f(10, "Validation batches per evaluation.")
    save: str | None = _f(None, "Checkpoint directory (orbax); metrics.jsonl and TensorBoard logs go here too.")
    save_interval: int = _f(500, "Save every N steps (and at the end).")
    save_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.")
    no_save_optim: bool = _f(False, "Save weights only (no optimizer state): smaller, not exactly resumable.")
    load: str | None = _f(None, "Resume from this checkpoint dir (or start from a HF dir's weights).")
    finetune: bool = _f(False, "With --load: take weights only and restart at step 0 with a fresh optimizer.")
    overwrite: bool = _f(False, "Start a new run in a --save dir that holds another run's checkpoints: delete them "
                                "(metrics.jsonl and args.json are kept under versioned names).")
    no_load_data_state: bool = _f(False, "Resume a checkpoint that lacks its data-loader state: restart the data "
                                         "order from the beginning instead of stopping with an error.")
    exit_signal_handler: bool = _f(True, "On SIGTERM / SIGINT finish the current step, save, and exit 0 "
                                         "(Megatron --exit_signal_handler); false: the default signal action.")
    log_interval: int = _f(1, "Print a log line every N steps.")
    tensorboard_dir: str | None = _f(None, "TensorBoard event dir (default: <save>/runs when --save is set).")
    async_save: bool = _f(True, "Write checkpoints in the background.")
    exit_interval: int | None = _f(None, "Stop (after saving) once the iteration is a multiple of this; the run can "
                                         "be resumed with --load (Megatron --exit_interval).")
    # ---- multi-process (see docs/multihost.md; SLURM srun steps are detected without these) ---------------
    coordinator_address: str | None = _f(None, "host:port of process 0's coordinator (jax.distributed); with "
                                               "--num_processes and --process_id.")
    num_processes: int | None = _f(None, "Number of processes of a multi-host job (1 = single process, even "
                                         "under srun).")
    process_id: int | None = _f(None, "This process's index in [0, --num_processes).")

    def validate(self) -> "TrainConfig":
        def bad(flag, msg):
            raise ConfigError(f"--{flag}: {msg}")

        for flag in ("micro_batch_size", "global_batch_size", "max_length", "eval_interval", "save_interval",
                     "log_interval", "eval_iters"):
            if getattr(self, flag) <= 0:
                bad(flag, f"must be a positive integer, got {getattr(self, flag)}")
        if self.global_batch_size % self.micro_batch_size:
            bad("global_batch_size", f"{self.global_batch_size} is not a multiple of --micro_batch_size "
                f"{self.micro_batch_size}; set it to a multiple (micro * data-parallel size * accumulation)")
        if self.train_iters is not None and self.train_iters <= 0:
            bad("train_iters", "must be positive")
        if self.max_epochs is not None and self.max_epochs <= 0:
            bad("max_epochs", "must be positive")
        if self.min_lr > self.lr:
            bad("min_lr", f"({self.min_lr}) is above --lr ({self.lr})")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            bad("lr_warmup_fraction", "must be in [0, 1)")
        if not 0 <= self.split_dataset_ratio < 1:
            bad("split_dataset_ratio", "must be in [0, 1)")
        if self.finetune and not self.load:
            bad("finetune", "needs --load (the checkpoint or HF dir whose weights to start from)")
        if self.load and not os.path.isdir(self.load) and not _same_dir(self.load, self.save):
            bad("load", f"{self.load!r} is not a directory (a --load equal to --save may be empty: first launch)")
        for f in self.dataset:
            if os.path.isdir(f):
                bad("dataset", f"{f!r} is a directory; pass the jsonl file(s) inside it")
            if not os.path.isfile(f):
                bad("dataset", f"{f!r} does not exist")
        if self.task == "sft" and self.data_path:
            bad("data_path", "is for --task pt (Megatron indexed data); SFT reads jsonl files from --dataset")
        if self.train_type == "lora":
            from jaxmoe.lora.adapters import LoraConfig
            LoraConfig.from_train_config(self)
        if self.adapter_load and self.train_type != "lora":
            bad("adapter_load", "needs --train_type lora")
        if self.adapter_load and not os.path.isdir(self.adapter_load):
            bad("adapter_load", f"{self.adapter_load!r} is not a directory (a jaxmoe LoRA checkpoint dir)")
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            bad("moe_pad_expert_input_to_capacity", "pads to the capacity of --moe_expert_capacity_factor; set one")
        for flag in ("moe_expert_capacity_factor", "moe_dispatch_buffer_factor"):
            if getattr(self, flag) is not None and not getattr(self, flag) > 0:
                bad(flag, f"must be a positive number, got {getattr(self, flag)}")
        bad_mods = set(self.recompute_modules) - {"core_attn", "moe_out", "mlp"}
        if bad_mods:
            bad("recompute_modules", f"unknown {sorted(bad_mods)}; choose from core_attn, moe_out, mlp")
        return self


def _parse_bool(s: str) -> bool:
    v = str(s).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxmoe.train",
        description="Train GLM-4.5 / GLM-4.5-Air (or the bundled tiny model) with SFT or pretraining. "
                    "Flags follow Megatron-SWIFT names; a YAML --config sets defaults that flags override.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of flag values (keys are flag names without --).")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        t, md = hints[f.name], f.metadata
        kw: dict[str, Any] = {"help": md["help"], "default": argparse.SUPPRESS}
        if "choices" in md:
            kw["choices"] = [c for c in md["choices"] if c is not None]
        if t is bool:
            kw.update(nargs="?", const=True, type=_parse_bool)
        elif "list" in str(t):
            kw.update(nargs="+")
        elif t in (int, float, str):
            kw["type"] = t
        else:  # Optional[...]
            base = int if "int" in str(t) else float if "float" in str(t) else str
            kw["type"] = base
        p.add_argument(f"--{f.name}", **kw)
    return p


def parse_args(argv=None) -> TrainConfig:
    p = build_parser()
    ns = vars(p.parse_args(argv))
    values: dict[str, Any] = {}
    cfg_path = ns.pop("config", None)
    if cfg_path:
        values.update(load_yaml(cfg_path))
    values.update(ns)
    return TrainConfig(**values).validate()


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        d = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of flag: value")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; run `python -m jaxmoe.train --help` for the flags")
    lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    return {k: _typed(k, v, f"{path}:{lines.get(k, '?')}: {k}") for k, v in d.items()}


def _typed(name: str, v: Any, where: str) -> Any:
    """A YAML value with the type, choices and parsing of its flag: `lr: 1e-3` (a string to YAML 1.1) is 0.001,
    `packing: "false"` is False, `train_iters: 2.5` and `micro_batch_size: null` are errors."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    t = str(get_type_hints(TrainConfig)[name])
    base = "bool" if "bool" in t else "list" if "list" in t else "int" if "int" in t else \
        "float" if "float" in t else "str"

    def bad(expected):
        raise ConfigError(f"{where}: expected {expected}, got {v!r}")

    if v is None:
        if "None" not in t:
            raise ConfigError(f"{where}: expected a value ({base}), got null; delete the key for the default "
                              f"{field.default!r}")
        return None
    if base == "bool":
        if isinstance(v, bool):
            return v
        try:
            return _parse_bool(v) if isinstance(v, (str, int)) else bad("true or false")
        except argparse.ArgumentTypeError:
            bad("true or false")
    if isinstance(v, bool) or isinstance(v, (dict, list)) and base != "list":
        bad(f"{'an integer' if base == 'int' else 'a number' if base == 'float' else 'a string'}")
    if base == "list":
        items = v.split() if isinstance(v, str) else v if isinstance(v, list) else bad("a list of strings")
        if any(isinstance(x, (dict, list, bool)) or x is None for x in items):
            bad("a list of strings")
        return [str(x) for x in items]
    if base == "int":
        if isinstance(v, float) or isinstance(v, str) and not v.strip().lstrip("+-").replace("_", "").isdigit():
            bad("an integer")
        v = int(v)
    elif base == "float":
        try:
            v = float(v)
        except ValueError:
            bad("a number (e.g. 1e-4)")
    else:
        v = str(v)
    choices = [c for c in field.metadata.get("choices", ()) if c is not None]
    if choices and v not in choices:
        bad(f"one of {', '.join(map(str, choices))}")
    return v


def _same_dir(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.abspath(a) == os.path.abspath(b)
