"""Megatron-Core `torch_dist` checkpoints: streaming reader (-> HF tensors) and writer (<- HF tensors).

A torch_dist checkpoint is a torch.distributed.checkpoint (DCP) directory whose keys are mcore's
ShardedTensor keys (see mcore_layout.py), plus Megatron's side files:

    <root>/latest_checkpointed_iteration.txt      "<iteration>" or "release"
    <root>/iter_0000100/ (or release/)
        metadata.json    {"sharded_backend": "torch_dist", ...}
        common.pt        torch.save({"args": Namespace, "checkpoint_version", "iteration", ...})
                         (mcore >= 0.19 keeps it inside DCP as `common_state`)
        .metadata        pickled DCP Metadata: per tensor its global shape and chunks
        __<r>_<i>.distcp torch.save blobs, one per chunk

The reader uses torch's FileSystemReader with its own read plan, so a region (one expert of a stacked
expert tensor) touches only the chunks that overlap it: memory stays at about one layer's non-expert
tensors plus one expert. The writer drives FileSystemWriter group by group (each group its own .distcp
file, bounded bytes), then writes one merged .metadata, so it never holds more than a group.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                   Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (BytesIOWriteData, LoadItemType, LoadPlan, ReadItem,
                                                  SavePlan, TensorWriteData, WriteItem, WriteItemType)

from jaxmoe.config import ModelConfig
from jaxmoe.convert.hf_layout import mtp_shared_specs
from jaxmoe.convert.mcore_layout import (McoreTensor, expert_to_hf, expert_to_mcore, hf_to_mcore,
                                         mcore_chunks, mcore_global_extra_state_keys,
                                         mcore_global_specs, mcore_layer_extra_state_keys,
                                         mcore_layer_specs, mcore_to_hf, padded_vocab_size)
from jaxmoe.convert.safetensors_io import CheckpointError, read_json
from jaxmoe.convert.unpickle import load_pickle, torch_load

TRACKER = "latest_checkpointed_iteration.txt"
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
# content_metadata as Megatron-LM (>= core 0.14) records it for model/optimizer sharded_state_dict
CONTENT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True}

_NP_OF_TORCH = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
                torch.uint8: np.uint8, torch.int8: np.int8, torch.bool: np.bool_}
_TORCH_OF_NP = {np.dtype(v): k for k, v in _NP_OF_TORCH.items()}
# key suffix jaxmoe expects -> the suffix a checkpoint saved with Megatron's local layer spec uses instead
_LOCAL_SPEC_KEYS = {"pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@contextlib.contextmanager
def _one_torch_thread():
    """Chunk copies are small; torch's intra-op threads only add spin-wait overhead (75x slower
    measured on a busy 2-core box), so conversion runs them single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def resolve_checkpoint_dir(path: str, iteration: int | str | None = None) -> tuple[str, int | str]:
    """Megatron root (with tracker file) or an iteration directory -> (iteration dir, iteration)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory; expected a Megatron checkpoint root (with "
                              f"{TRACKER}) or an iter_XXXXXXX/ directory")
    base = os.path.basename(os.path.normpath(path))
    if iteration is None and (base.startswith("iter_") or base == "release"):
        it = "release" if base == "release" else int(base[5:])
        return path, it
    if iteration is None:
        tracker = os.path.join(path, TRACKER)
        if not os.path.exists(tracker):
            raise CheckpointError(f"{path}: no {TRACKER} and not an iter_XXXXXXX/ or release/ "
                                  "directory; not a Megatron checkpoint")
        text = open(tracker).read().strip()
        if text == "release":
            iteration = "release"
        else:
            try:
                iteration = int(text)
            except ValueError:
                raise CheckpointError(f"{tracker}:1: {text!r} is neither an iteration number nor "
                                      "'release'") from None
    d = os.path.join(path, iter_dir_name(iteration))
    if not os.path.isdir(d):
        raise CheckpointError(f"{path}: iteration {iteration} selected but {d} does not exist")
    return d, iteration


class _RegionPlanner:
    """Minimal LoadPlanner for FileSystemReader.read_data: copies chunk overlaps into one tensor."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        t = self.out
        for dim, (o, n) in enumerate(zip(req.dest_offsets, req.lengths)):
            t = t.narrow(dim, o, n)
        return t

    def commit_tensor(self, req, tensor) -> None:
        pass

    def load_bytes(self, req, value) -> None:
        self.blob = value.read()


class McoreDistReader:
    """Reads tensors (or regions of them) from a torch_dist checkpoint without megatron."""

    def __init__(self, path: str, iteration: int | str | None = None):
        self.dir, self.iteration = resolve_checkpoint_dir(path, iteration)
        mj = os.path.join(self.dir, "metadata.json")
        if not os.path.exists(mj):
            raise CheckpointError(f"{self.dir}: no metadata.json; not a Megatron dist checkpoint (a "
                                  "legacy torch-format checkpoint has mp_rank_XX/ dirs instead)")
        meta = read_json(mj)
        if meta.get("sharded_backend") != "torch_dist":
            raise CheckpointError(f"{mj}: sharded_backend is {meta.get('sharded_backend')!r}; only "
                                  "'torch_dist' is supported (re-save with --ckpt-format torch_dist)")
        md_path = os.path.join(self.dir, ".metadata")
        if not os.path.exists(md_path):
            raise CheckpointError(f"{self.dir}: no .metadata; the DCP save did not finish")
        self.metadata: Metadata = load_pickle(md_path)
        self._fs = FileSystemReader(self.dir)
        self._fs.set_up_storage_reader(self.metadata, True)
        self._chunk_cache: dict = {}
        self.common = self._load_common()
        self.args = self.common.get("args") if isinstance(self.common, dict) else None

    def _load_common(self):
        cp = os.path.join(self.dir, "common.pt")
        if os.path.exists(cp):
            return torch_load(cp)
        keys = [k for k, v in self.metadata.state_dict_metadata.items()
                if k.startswith("common_state") and isinstance(v, BytesStorageMetadata)]
        if keys:  # mcore >= 0.19: common state is a bytes item inside DCP
            return torch_load(io.BytesIO(self.read_bytes(keys[0])))
        raise CheckpointError(f"{self.dir}: neither common.pt nor a common_state item; incomplete checkpoint")

    # ---- raw access ---------------------------------------------------------------------
    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tmeta(key).size)

    def _key(self, key: str) -> str:
        """The stored name of `key`: Megatron's local (non-TE) layer spec saves a MoE layer's pre-MLP norm under
        the TE name of the dense MLP's fused norm (its sharded_state_dict_keys_map)."""
        keys = self.metadata.state_dict_metadata
        for suffix, local in _LOCAL_SPEC_KEYS.items():
            if key not in keys and key.endswith(suffix) and key[:-len(suffix)] + local in keys:
                return key[:-len(suffix)] + local
        return key

    def _tmeta(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(self._key(key))
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.dir}: no tensor `{key}` in the checkpoint")
        return md

    def read_bytes(self, key: str) -> bytes:
        item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex(key), torch.Size(()), MetadataIndex(key),
                        torch.Size(()), torch.Size(()))
        pl = _RegionPlanner(None)
        self._fs.read_data(LoadPlan([item]), pl).wait()
        return pl.blob

    def read(self, key: str, offsets=None, sizes=None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of tensor `key`, reading only overlapping chunks."""
        md, key = self._tmeta(key), self._key(key)
        full = tuple(md.size)
        offsets = tuple(offsets or (0,) * len(full))
        sizes = tuple(sizes or full)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        items, covered = [], 0
        c_off, c_size = self._chunk_arrays(key, md)
        lo_all = np.maximum(c_off, offsets)
        hi_all = np.minimum(c_off + c_size, np.add(offsets, sizes))
        for i in np.flatnonzero((hi_all > lo_all).all(axis=1)):
            ch = md.chunks[i]
            lo, hi = lo_all[i].tolist(), hi_all[i].tolist()
            lengths = [h - l for l, h in zip(lo, hi)]
            covered += int(np.prod(lengths))
            items.append(ReadItem(
                LoadItemType.TENSOR, MetadataIndex(key, offsets), torch.Size([l - o for l, o in zip(lo, offsets)]),
                MetadataIndex(key, ch.offsets), torch.Size([l - c for l, c in zip(lo, ch.offsets)]),
                torch.Size(lengths)))
        if covered != int(np.prod(sizes)):
            raise CheckpointError(
                f"{self.dir}: tensor `{key}` {list(full)}: its chunks cover {covered} of the "
                f"{int(np.prod(sizes))} elements in region offsets={list(offsets)} sizes={list(sizes)}; "
                "a shard (e.g. an expert) is missing from the checkpoint")
        with _one_torch_thread():
            self._fs.read_data(LoadPlan(items), _RegionPlanner(out)).wait()
        return out

    def _chunk_arrays(self, key: str, md: TensorStorageMetadata) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._chunk_cache:  # vectorised overlap test: experts have E-2E chunks
            self._chunk_cache[key] = (np.array([list(c.offsets) for c in md.chunks], np.int64),
                                      np.array([list(c.sizes) for c in md.chunks], np.int64))
        return self._chunk_cache[key]

    # ---- HF view --------------------------------------------------------------------------
    def padded_vocab(self) -> int:
        return self.shape("embedding.word_embeddings.weight")[0]

    def has_mtp(self) -> bool:
        return any(k.startswith("mtp.layers.") for k in self.metadata.state_dict_metadata)

    def plan(self, cfg: ModelConfig) -> list[list[McoreTensor]]:
        """Validate every key/shape/coverage against the config; -> mcore specs grouped per layer."""
        keys = self.metadata.state_dict_metadata
        if "embedding.word_embeddings.weight" not in keys:
            raise CheckpointError(f"{self.dir}: no embedding.word_embeddings.weight; not a GPT model "
                                  "checkpoint (or not the first pipeline stage's)")
        pv = self.padded_vocab()
        if pv < cfg.vocab_size:
            raise CheckpointError(f"{self.dir}: embedding has {pv} rows < vocab_size {cfg.vocab_size} "
                                  "in the model config; the config does not match the checkpoint")
        n_layers = cfg.num_hidden_layers
        if self.has_mtp():
            if cfg.num_nextn_predict_layers == 0:
                raise CheckpointError(f"{self.dir}: has mtp.layers.* but num_nextn_predict_layers=0 "
                                      "in the config; set it to the checkpoint's mtp_num_layers")
            n_layers += cfg.num_nextn_predict_layers
        groups = [[s for s in mcore_global_specs(cfg, pv) if s.key.startswith("embedding")]]
        groups += [mcore_layer_specs(cfg, layer) for layer in range(n_layers)]
        groups.append([s for s in mcore_global_specs(cfg, pv) if not s.key.startswith("embedding")])
        for group in groups:
            for s in group:
                if self._key(s.key) not in keys:
                    alt = "".join(f" (or `{s.key[:-len(a)] + b}`)" for a, b in _LOCAL_SPEC_KEYS.items()
                                  if s.key.endswith(a))
                    raise CheckpointError(f"{self.dir}: missing tensor `{s.key}`{alt} (shape {list(s.shape)}) "
                                          "that the model config requires; wrong config "
                                          "(num_hidden_layers / first_k_dense_replace / use_qk_norm / "
                                          "attention_bias / num_nextn_predict_layers?)")
                if self.shape(s.key) != s.shape:
                    raise CheckpointError(f"{self.dir}: tensor `{s.key}` has shape {list(self.shape(s.key))}"
                                          f", the model config implies {list(s.shape)}; the config does "
                                          "not describe this checkpoint")
                md = self._tmeta(s.key)
                got = sum(int(np.prod(c.sizes)) for c in md.chunks)
                if got != int(np.prod(s.shape)):
                    raise CheckpointError(f"{self.dir}: tensor `{s.key}` {list(s.shape)} has chunks for "
                                          f"{got} of {int(np.prod(s.shape))} elements; a shard (e.g. an "
                                          "expert) is missing from the checkpoint")
        return groups

    def iter_hf(self, cfg: ModelConfig, mtp_shared: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (hf_key, array) for the whole model, layer by layer, experts one at a time.
        `mtp_shared` also yields the MTP layers' embedding / lm_head copies (GLM-4.5 layout)."""
        groups = self.plan(cfg)
        for group in groups:
            for s in group:
                if s.rule in ("experts_fc1", "experts_fc2"):
                    for e in range(s.shape[0]):
                        region = self.read(s.key, (e,) + (0,) * (len(s.shape) - 1), (1,) + s.shape[1:])
                        yield from expert_to_hf(s, e, to_numpy(region)[0])
                else:
                    yield from mcore_to_hf(cfg, s, to_numpy(self.read(s.key)))
        if mtp_shared and self.has_mtp():
            emb = to_numpy(self.read("embedding.word_embeddings.weight"))[: cfg.vocab_size]
            head = to_numpy(self.read("output_layer.weight"))[: cfg.vocab_size]
            for layer in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
                e_spec, h_spec = mtp_shared_specs(cfg, layer)
                yield e_spec.key, emb
                yield h_spec.key, head


class McoreHFGetter:
    """`get(hf_key)` over a torch_dist checkpoint: reads the mcore tensor (or one expert's region) that holds
    the key, splits it to HF tensors and keeps the last few, so q/k/v or gate/up cost one read."""

    def __init__(self, reader, cfg: ModelConfig):
        self.r, self.cfg, self._cache = reader, cfg, {}
        self._src = {}
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        specs = mcore_global_specs(cfg, reader.padded_vocab()) + [s for l in range(n) for s in mcore_layer_specs(cfg, l)]
        for s in specs:
            for i, k in enumerate(s.hf_keys):
                e = (i // 2 if s.rule == "experts_fc1" else i) if s.rule.startswith("experts") else None
                self._src[k] = (s, e)

    def __call__(self, key: str) -> np.ndarray:
        s, e = self._src[key]
        ck = (s.key, e)
        if ck not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            if e is None:
                self._cache[ck] = dict(mcore_to_hf(self.cfg, s, to_numpy(self.r.read(s.key))))
            else:
                region = self.r.read(s.key, (e,) + (0,) * (len(s.shape) - 1), (1,) + s.shape[1:])
                self._cache[ck] = dict(expert_to_hf(s, e, to_numpy(region)[0]))
        return self._cache[ck][key]


# ---- writer ---------------------------------------------------------------------------------
def megatron_args(cfg: ModelConfig, *, padded_vocab: int, tp: int = 1, pp: int = 1, ep: int = 1,
                  params_dtype=torch.bfloat16, iteration: int = 1, **overrides) -> argparse.Namespace:
    """The args Megatron-LM / Megatron-SWIFT read back from a checkpoint (checkpoint_args check,
    model construction when --use-checkpoint-args)."""
    dense = cfg.first_k_dense_replace
    n_mtp = cfg.num_nextn_predict_layers
    d = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_key_value_heads != cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=4096,
        position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
        rotary_percent=cfg.partial_rotary_factor, rotary_interleaved=False,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, swiglu=True,
        add_qkv_bias=cfg.attention_bias, add_bias_linear=False, qk_layernorm=cfg.use_qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128,
        num_experts=cfg.n_routed_experts, moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.shared_intermediate_size or None,
        moe_router_topk=cfg.num_experts_per_tok, moe_router_num_groups=cfg.n_group,
        moe_router_group_topk=cfg.topk_group, moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False, moe_router_dtype="fp32",
        moe_layer_freq=[0] * dense + [1] * (cfg.num_hidden_layers - dense),
        mtp_num_layers=n_mtp or None, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1, context_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=False,
        ckpt_format="torch_dist", iteration=iteration, consumed_train_samples=0,
        consumed_valid_samples=0,
    )
    d.update(overrides)
    return argparse.Namespace(**d)


def extra_state_bytes() -> io.BytesIO:
    """What mcore stores for a TE module's _extra_state without FP8: torch.save([empty uint8])."""
    buf = io.BytesIO()
    torch.save([torch.empty(0, dtype=torch.uint8)], buf)
    buf.seek(0)
    return buf


class _LazySavePlanner:
    """resolve_data for FileSystemWriter: computes each chunk from HF tensors when it is written."""

    def __init__(self, resolve: dict[MetadataIndex, Callable[[], object]]):
        self._resolve = resolve

    def resolve_data(self, item: WriteItem):
        return self._resolve[item.index]()


def write_mcore_dist(out_dir: str, cfg: ModelConfig, get_hf: Callable[[str], np.ndarray], *,
                     dtype=ml_dtypes.bfloat16, iteration: int | str = 1, padded_vocab: int | None = None,
                     tp: int = 1, pp: int = 1, ep: int = 1, include_mtp: bool = True,
                     max_group_bytes: int = 512 << 20, args_overrides: dict | None = None,
                     update_tracker: bool = True) -> str:
    """Write a torch_dist checkpoint of the model whose HF tensors `get_hf(key)` returns.

    Parameters are cast to `dtype` (router expert_bias stays fp32). Returns the iteration dir.
    `tp`/`pp`/`ep` are recorded in args only: torch_dist tensors are parallelism-independent.
    """
    out_dir = os.fspath(out_dir)
    dtype = np.dtype(dtype)
    pv = padded_vocab or padded_vocab_size(cfg.vocab_size, 128, tp)
    if pv < cfg.vocab_size:
        raise CheckpointError(f"padded_vocab={pv} < vocab_size={cfg.vocab_size}")
    final = os.path.join(out_dir, iter_dir_name(iteration))
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists; choose another output or iteration")
    tmp = final + f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_dcp(tmp, cfg, get_hf, dtype, pv, include_mtp, max_group_bytes)
        torch_dtype = _TORCH_OF_NP[dtype]
        common = {"args": megatron_args(cfg, padded_vocab=pv, tp=tp, pp=pp, ep=ep, params_dtype=torch_dtype,
                                        iteration=0 if iteration == "release" else int(iteration),
                                        **(args_overrides or {})),
                  "checkpoint_version": 3.0,
                  "iteration": 0 if iteration == "release" else int(iteration),
                  "content_metadata": dict(CONTENT_METADATA)}
        if not include_mtp:
            common["args"].mtp_num_layers = None
        torch.save(common, os.path.join(tmp, "common.pt"))
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(METADATA_JSON, f)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_tracker:
        t = os.path.join(out_dir, TRACKER)
        with open(t + ".tmp", "w") as f:
            f.write(f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n")
        os.replace(t + ".tmp", t)
    return final


def _write_dcp(path: str, cfg: ModelConfig, get_hf, dtype: np.dtype, pv: int, include_mtp: bool,
               max_group_bytes: int) -> None:
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    g = mcore_global_specs(cfg, pv)
    specs = [g[0]] + [s for layer in range(n_layers) for s in mcore_layer_specs(cfg, layer)] + g[1:]
    extra = mcore_global_extra_state_keys() + [k for layer in range(n_layers)
                                                 for k in mcore_layer_extra_state_keys(cfg, layer)]

    def fetch(key: str) -> np.ndarray:
        return np.asarray(get_hf(key))

    def chunk_fn(s: McoreTensor, offsets, sizes, tdt: np.dtype):
        def make():
            if s.rule == "experts_fc1":
                half = int(offsets[1] >= s.shape[1] // 2)  # fc1 chunk = gate or up half
                v = fetch(s.hf_keys[2 * offsets[0] + half])[None]
            elif s.rule == "experts_fc2":
                v = expert_to_mcore(s, offsets[0], fetch)[None]
            else:
                v = hf_to_mcore(cfg, s, fetch)
            if tuple(v.shape) != tuple(sizes):
                raise CheckpointError(f"HF tensors for `{s.key}` give shape {list(v.shape)} at chunk "
                                      f"{list(offsets)}, expected {list(sizes)}; the config does not "
                                      f"match the HF checkpoint ({', '.join(s.hf_keys[:3])}...)")
            return to_torch(np.array(v, dtype=tdt, copy=True))  # own buffer: DCP saves whole storages
        return make

    state_md: dict = {}
    groups: list[list[tuple[WriteItem, Callable]]] = [[]]
    gbytes = 0
    for s in specs:
        tdt = np.dtype(np.float32) if s.fp32 else dtype
        props = TensorProperties(dtype=_TORCH_OF_NP[tdt])
        chunks = mcore_chunks(s)
        state_md[s.key] = TensorStorageMetadata(
            properties=props, size=torch.Size(s.shape),
            chunks=[ChunkStorageMetadata(torch.Size(o), torch.Size(z)) for o, z in chunks])
        for o, z in chunks:
            nb = int(np.prod(z)) * tdt.itemsize
            if groups[-1] and gbytes + nb > max_group_bytes:
                groups.append([])
                gbytes = 0
            item = WriteItem(index=MetadataIndex(s.key, o), type=WriteItemType.TENSOR,
                             tensor_data=TensorWriteData(ChunkStorageMetadata(torch.Size(o), torch.Size(z)),
                                                         props, torch.Size(s.shape)))
            groups[-1].append((item, chunk_fn(s, o, z, tdt)))
            gbytes += nb
    blob = extra_state_bytes().getvalue()
    for k in extra:
        state_md[k] = BytesStorageMetadata()
        item = WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO,
                         bytes_io_data=BytesIOWriteData(len(blob)))
        groups[-1].append((item, lambda: io.BytesIO(blob)))

    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    writer.set_up_storage_writer(True)
    results = []
    with _one_torch_thread():
        for gi, group in enumerate(groups):
            plan = SavePlan(items=[it for it, _ in group], storage_data=_StoragePrefix(f"__{gi}_"))
            planner = _LazySavePlanner({it.index: fn for it, fn in group})
            results.append(writer.write_data(plan, planner).value())
        writer.finish(Metadata(state_dict_metadata=state_md), results)


def hf_dir_to_mcore_dist(hf_dir: str, out_dir: str, cfg: ModelConfig, **kw) -> str:
    """Convenience: HF safetensors directory -> torch_dist (dtype defaults to the checkpoint's)."""
    from jaxmoe.convert.hf_layout import check_hf_keys
    from jaxmoe.convert.safetensors_io import HFCheckpointReader
    r = HFCheckpointReader(hf_dir)
    info = check_hf_keys(cfg, r.shapes(), hf_dir)
    kw.setdefault("dtype", r.spec("model.embed_tokens.weight").dtype)
    kw.setdefault("include_mtp", info["mtp"])
    return write_mcore_dist(out_dir, cfg, r.get, **kw)


def mcore_dist_to_hf_dir(src: str, out_dir: str, cfg: ModelConfig, *, mtp_shared: bool = False,
                         max_shard_bytes: int = 5 * 1024 ** 3, iteration=None) -> str:
    """Convenience: torch_dist -> HF safetensors directory (tensors streamed one at a time)."""
    from jaxmoe.convert.hf_layout import hf_tensor_specs
    from jaxmoe.convert.safetensors_io import HFCheckpointWriter
    r = McoreDistReader(src, iteration)
    r.plan(cfg)
    param_dt = np.dtype(_NP_OF_TORCH[r._tmeta("embedding.word_embeddings.weight").properties.dtype])
    specs = hf_tensor_specs(cfg, include_mtp=r.has_mtp(), mtp_shared=mtp_shared and r.has_mtp())
    manifest = [(k, shape, np.float32 if kind == "router_bias" else param_dt) for k, shape, kind in specs]
    dts = {k: dt for k, _, dt in manifest}
    with HFCheckpointWriter(out_dir, manifest, max_shard_bytes=max_shard_bytes) as w:
        for k, a in r.iter_hf(cfg, mtp_shared=mtp_shared):
            w.write(k, a.astype(dts[k], copy=False))
    return out_dir


__all__ = ["McoreDistReader", "write_mcore_dist", "resolve_checkpoint_dir", "megatron_args",
           "hf_dir_to_mcore_dist", "mcore_dist_to_hf_dir", "to_numpy", "to_torch"]
