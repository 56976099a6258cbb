"""jaxmoe training checkpoints (orbax) <-> HF tensor names, one layer slice (one expert) at a time.

A jaxmoe.train checkpoint is an orbax CheckpointManager directory:

    <root>/<step>/_CHECKPOINT_METADATA     item handlers, timestamps
    <root>/<step>/state/                   the train-state pytree: params, model_state [, opt_state, ...]
        _METADATA                          tree structure: one entry per leaf ('params', 'moe', 'wq') ...
        <leaf name>/ (or OCDBT files)      one zarr array per leaf, name = '.'.join(path)
    <root>/<step>/meta/metadata            JSON: model_config (HF config.json dict), iteration, ...

Writing: orbax's own save (StandardSave) needs every leaf in memory at once (a stacked expert leaf of
GLM-4.5-Air is 133 GB in bf16) and its public API has no per-slice write, so the writer lays out the
on-disk format orbax's StandardCheckpointHandler writes with `use_ocdbt=False` itself: per leaf, orbax's
public `type_handlers.get_json_tspec_write` gives the zarr spec (zstd, the chunk shape = one layer, or one
layer and one expert for routed experts) and tensorstore writes slice by slice; `_METADATA` and
`_CHECKPOINT_METADATA` are written here. orbax's standard restore (full or partial, any target sharding)
reads it; tests/test_orbax_io.py proves that and pins the metadata against what orbax itself writes, so an
orbax upgrade that changes the format fails there.

Reading: the tree is taken from `_METADATA`, each leaf is opened with orbax's `get_json_tspec_read` (OCDBT
or not, as the checkpoint says) and read slice by slice; leaves other than params / model_state (optimizer
state, counters) are never touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Callable, Iterator

import numpy as np
import tensorstore as ts

from jaxmoe.config import ModelConfig
from jaxmoe.convert.hf_params import BIAS_SUFFIX, _ATTN, _MLP, _MTP, read_param, read_state
from jaxmoe.convert.safetensors_io import CheckpointError, read_json

STATE, META = "state", "meta"
_TREE_FILE = "_METADATA"
_STEP_META = "_CHECKPOINT_METADATA"


def _handler_names() -> dict[str, str]:
    """The handler type names orbax records per item in _CHECKPOINT_METADATA (module path of its classes)."""
    import orbax.checkpoint as ocp
    return {item: f"{cls.__module__}.{cls.__qualname__}" for item, cls in
            (("meta", ocp.JsonCheckpointHandler), ("state", ocp.StandardCheckpointHandler))}


def _param_info(directory: str, name: str, use_zarr3: bool):
    """orbax's description of one leaf array (public ocp.type_handlers.ParamInfo)."""
    import orbax.checkpoint as ocp
    from etils import epath
    return ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(directory), use_zarr3=use_zarr3)


def _leaf_paths(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """(tree path, shape, is_float32_state) of every params / model_state leaf, in flatten order."""
    import jax

    from jaxmoe.model.params import init_state, is_spec, param_specs
    out = []
    flat, _ = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)
    for path, spec in flat:
        out.append((("params",) + tuple(str(k.key) for k in path), tuple(spec.shape), False))
    for k, v in init_state(cfg).items():
        out.append((("model_state", k), tuple(v.shape), True))
    return out


def _slices(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[tuple[slice, ...]]]:
    """(chunk shape, list of index blocks) a leaf is written in: one layer, or one layer + one expert."""
    if path[0] == "model_state" or len(path) == 2:  # embed / lm_head / final_norm / router biases
        return shape, [tuple(slice(None) for _ in shape)]
    if path[-1] in ("experts_wi", "experts_wo"):
        chunk = (1, 1) + shape[2:]
        return chunk, [(slice(l, l + 1), slice(e, e + 1)) for l in range(shape[0]) for e in range(shape[1])]
    return (1,) + shape[1:], [(slice(l, l + 1),) for l in range(shape[0])]


def _prepare_output(out_dir: str) -> tuple[str, str, bool]:
    """-> (temporary root, final root, whether the root itself is renamed). Refuses a non-empty output."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"--output {out_dir}: exists and is not a directory")
        if os.listdir(out_dir):
            raise CheckpointError(f"--output {out_dir}: directory is not empty; choose a new or empty "
                                  "directory (an orbax root holds one checkpoint per step)")
        return os.path.join(out_dir, f".partial-{os.getpid()}"), out_dir, False
    return f"{out_dir.rstrip(os.sep)}.partial-{os.getpid()}", out_dir, True


def write_orbax(out_dir: str, cfg: ModelConfig, get_hf: Callable[[str], np.ndarray], *, dtype=np.float32,
                step: int = 0, meta_extra: dict | None = None,
                progress: Callable[[int], None] | None = None, root_files: list[str] = ()) -> str:
    """Write a jaxmoe.train checkpoint (`<out_dir>/<step>/`: state = {params, model_state}, meta) of the model
    whose HF tensors `get_hf(key)` returns. Parameters are cast to `dtype` (router biases stay fp32).
    Host RAM: one leaf slice (one layer, or one expert of one layer) plus the HF tensors it is built from.
    `progress(nbytes)` is called after each slice; `root_files` (tokenizer files) are copied next to the step
    dir (not config.json: jaxmoe.train takes a dir with config.json for a HF dir). Nothing appears at
    `out_dir/<step>` until all is written."""
    import orbax.checkpoint as ocp

    dtype = np.dtype(dtype)
    tmp_root, final_root, rename_root = _prepare_output(out_dir)
    shutil.rmtree(tmp_root, ignore_errors=True)
    step_dir = os.path.join(tmp_root, str(int(step)))
    state_dir = os.path.join(step_dir, STATE)
    os.makedirs(state_dir)
    t0 = time.time_ns()
    ctx = ocp.type_handlers.get_ts_context(use_ocdbt=False)
    try:
        tree = {}
        state_np = None
        for path, shape, is_state in _leaf_paths(cfg):
            name = ".".join(path)
            dt = np.dtype(np.float32) if is_state else dtype
            chunk, blocks = _slices(path, shape)
            # orbax's own zarr spec for a leaf; local_shape is the chunk (orbax's write shape)
            spec = ocp.type_handlers.get_json_tspec_write(_param_info(state_dir, name, use_zarr3=False),
                                                          use_ocdbt=False, global_shape=shape, local_shape=chunk,
                                                          dtype=dt)
            arr = ts.open(spec, create=True, open=True, context=ctx).result()
            for idx in blocks:
                if is_state:
                    if state_np is None:
                        state_np = read_state(cfg, get_hf)
                    v = state_np[path[1]]
                else:
                    v = read_param("/".join(path[1:]), cfg, get_hf, idx if len(path) > 2 else None)
                v = np.asarray(v).astype(dt, copy=False)
                arr[idx].write(v).result()
                if progress:
                    progress(v.nbytes)
                del v
            tree[str(path)] = {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                               "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                                  "write_shape": list(chunk)}}
        _write_json(os.path.join(state_dir, _TREE_FILE),
                    {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                     "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
        meta = {"model_config": cfg.to_hf_dict(), "train_config": None, "iteration": int(step),
                "consumed_samples": 0, **(meta_extra or {})}
        os.makedirs(os.path.join(step_dir, META))
        _write_json(os.path.join(step_dir, META, "metadata"), meta)
        _write_json(os.path.join(step_dir, _STEP_META),
                    {"item_handlers": _handler_names(), "metrics": {}, "performance_metrics": {},
                     "init_timestamp_nsecs": t0, "commit_timestamp_nsecs": time.time_ns(),
                     "custom_metadata": {}})
        for f in root_files:
            shutil.copy(f, os.path.join(tmp_root, os.path.basename(f)))
        if rename_root:
            os.rename(tmp_root, final_root)
        else:
            for f in root_files:
                os.rename(os.path.join(tmp_root, os.path.basename(f)), os.path.join(final_root, os.path.basename(f)))
            os.rename(step_dir, os.path.join(final_root, str(int(step))))
            os.rmdir(tmp_root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return os.path.join(final_root, str(int(step)))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


# ---- reader -----------------------------------------------------------------------------------
def resolve_step_dir(path: str, step: int | None = None) -> str:
    """An orbax root (<dir>/<step>/...) or one step directory -> the step directory to read."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory; expected a jaxmoe.train checkpoint directory "
                              "(<dir>/<step>/state, written by `python -m jaxmoe.train --save` or "
                              "`python -m jaxmoe.convert hf-to-orbax`)")
    if os.path.isdir(os.path.join(path, STATE)) and step is None:
        return path
    steps = sorted(int(n) for n in os.listdir(path)
                   if n.isdigit() and os.path.isdir(os.path.join(path, n, STATE)))
    if not steps:
        raise CheckpointError(f"{path}: no <step>/state/ directory; not a (complete) jaxmoe.train orbax "
                              "checkpoint. Unfinished saves end in .orbax-checkpoint-tmp and are skipped")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"{path}: --iteration {step} not found; checkpoints here: {steps}")
    return os.path.join(path, str(step))


class OrbaxCheckpointReader:
    """Validated, lazy view of the params / model_state of a jaxmoe.train checkpoint."""

    def __init__(self, path: str, step: int | None = None, cfg: ModelConfig | None = None):
        self.dir = resolve_step_dir(path, step)
        self.state_dir = os.path.join(self.dir, STATE)
        tree_file = os.path.join(self.state_dir, _TREE_FILE)
        if not os.path.isfile(tree_file):
            raise CheckpointError(f"{self.state_dir}: no {_TREE_FILE}; the orbax save did not finish or this is "
                                  "not an orbax pytree checkpoint")
        tm = read_json(tree_file)
        self.use_ocdbt = bool(tm.get("use_ocdbt", True))
        self.use_zarr3 = bool(tm.get("use_zarr3", False))
        self.leaves = {tuple(str(k["key"]) for k in ent["key_metadata"])
                       for ent in tm.get("tree_metadata", {}).values()}
        meta_file = os.path.join(self.dir, META, "metadata")
        if not os.path.isfile(meta_file):
            raise CheckpointError(f"{self.dir}: no {META}/metadata; not a jaxmoe.train checkpoint (its meta item "
                                  "holds the model config)")
        self.meta = read_json(meta_file)
        if cfg is None:
            if "model_config" not in self.meta:
                raise CheckpointError(f"{meta_file}: no `model_config`; pass --config config.json")
            cfg = ModelConfig.from_hf_dict(self.meta["model_config"], where=f"{meta_file} model_config")
        self.cfg = cfg
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}
        self._ctx = None
        self._cache: dict = {}
        self.plan()

    def leaf(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._open:
            import orbax.checkpoint as ocp
            spec = ocp.type_handlers.get_json_tspec_read(
                _param_info(self.state_dir, ".".join(path), use_zarr3=self.use_zarr3), use_ocdbt=self.use_ocdbt)
            if self._ctx is None:  # orbax's context: OCDBT specs name its cache pool
                self._ctx = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
            try:
                self._open[path] = ts.open(spec, open=True, context=self._ctx).result()
            except ValueError as e:
                raise CheckpointError(f"{self.state_dir}: leaf `{'.'.join(path)}` is listed in {_TREE_FILE} but "
                                      f"cannot be opened ({str(e).splitlines()[0]}); the checkpoint is "
                                      "incomplete") from None
        return self._open[path]

    def plan(self) -> None:
        """Check that every params / model_state leaf the config needs is present with the right shape."""
        for path, shape, _ in _leaf_paths(self.cfg):
            name = ".".join(path)
            if path not in self.leaves:
                raise CheckpointError(f"{self.state_dir}: missing leaf `{name}` (shape {list(shape)}) that the "
                                      "model config requires; the checkpoint's meta model_config does not "
                                      "match its state (or --config is wrong)")
            got = tuple(self.leaf(path).shape)
            if got != shape:
                raise CheckpointError(f"{self.state_dir}: leaf `{name}` has shape {list(got)}, the model config "
                                      f"implies {list(shape)}; config and checkpoint disagree")

    def dtype(self) -> np.dtype:
        return np.dtype(self.leaf(("params", "embed")).dtype.numpy_dtype)

    def read(self, path: tuple[str, ...], idx=()) -> np.ndarray:
        return np.asarray(self.leaf(path)[idx].read().result())

    def lazy_tree(self) -> tuple[dict, dict]:
        """(params, model_state) trees of tensorstore handles (indexing is lazy; `to_host` reads)."""
        params: dict = {}
        for path, _, _ in _leaf_paths(self.cfg):
            d = params if path[0] == "params" else params.setdefault("__state__", {})
            for k in path[1:-1]:
                d = d.setdefault(k, {})
            d[path[-1]] = self.leaf(path)
        return params, params.pop("__state__", {})

    # ---- HF view: key -> tensor (for writers that pull tensors in their own order) ----------------
    def get(self, key: str) -> np.ndarray:
        c = self.cfg
        fixed = {"model.embed_tokens.weight": ("embed",), "lm_head.weight": ("lm_head",),
                 "model.norm.weight": ("final_norm",)}
        if key in fixed:
            return self.read(("params",) + fixed[key])
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
        if not m:
            raise CheckpointError(f"{self.dir}: no HF tensor `{key}` in a GLM4-MoE model")
        n, rest = int(m.group(1)), m.group(2)
        L = c.num_hidden_layers
        group, l = ("dense", n) if n < c.num_dense_layers else ("moe", n - c.num_dense_layers) if n < L \
            else ("mtp", n - L)
        base = ("params", group) + (("layer",) if group == "mtp" else ())
        if rest == BIAS_SUFFIX and group != "dense":
            return self.read(("model_state", f"{group}_bias"), l).astype(np.float32)
        if group == "mtp":
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                return self.get("model.embed_tokens.weight" if rest.startswith("embed") else "lm_head.weight")
            for name, suffix in _MTP.items():
                if rest == suffix:
                    v = self.read(("params", "mtp", name), l)
                    return np.ascontiguousarray(v.T) if name == "eh_proj" else v
        me = re.match(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", rest)
        if me:
            e, w = int(me.group(1)), me.group(2)
            leaf = base + ("experts_wo" if w == "down" else "experts_wi",)
            v = self._cached(leaf, (l, e))
            return np.ascontiguousarray(v.T if w == "down" else v[:, 0 if w == "gate" else 1].T)
        H = c.hidden_size
        for name, suffix in _ATTN.items():
            if rest == suffix:
                v = self._cached(base + (name,), l)
                if name in ("wq", "wk", "wv"):
                    return np.ascontiguousarray(v.reshape(H, -1).T)
                if name in ("bq", "bk", "bv"):
                    return v.reshape(-1)
                if name == "wo":
                    return np.ascontiguousarray(v.reshape(-1, H).T)
                return v
        for name, suffix in _MLP.items():
            if isinstance(suffix, tuple) and rest in suffix:
                v = self._cached(base + (name,), l)
                return np.ascontiguousarray(v[:, suffix.index(rest)].T)
            if rest == suffix:
                return np.ascontiguousarray(self._cached(base + (name,), l).T)
        raise CheckpointError(f"{self.dir}: HF tensor `{key}` has no source in the jaxmoe parameters")

    def _cached(self, path, idx):
        """The last few slices read (gate and up of one expert come from one slice)."""
        k = (path, idx)
        if k not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = self.read(path, idx)
        return self._cache[k]


def to_host(x) -> np.ndarray:
    """`to_host` for hf_params.iter_hf_tensors over a lazy_tree(): reads a tensorstore view."""
    if isinstance(x, ts.TensorStore):
        return np.asarray(x.read().result())
    return np.asarray(x)


def iter_orbax_hf(reader: OrbaxCheckpointReader) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_key, array) for the whole model (MTP embedding / head copies included), one slice at a time."""
    from jaxmoe.convert.hf_params import iter_hf_tensors
    params, state = reader.lazy_tree()
    yield from iter_hf_tensors(params, state, reader.cfg, to_host=to_host)


def read_params(reader: OrbaxCheckpointReader, dtype=np.float32) -> tuple[dict, dict]:
    """Whole (params, model_state) as numpy trees (for verification of models that fit in RAM)."""
    params, state = reader.lazy_tree()

    def load(tree):
        return {k: load(v) if isinstance(v, dict) else to_host(v) for k, v in tree.items()}
    p = load(params)
    import jax
    return jax.tree.map(lambda a: a.astype(dtype), p), load(state)


__all__ = ["write_orbax", "OrbaxCheckpointReader", "iter_orbax_hf", "read_params", "resolve_step_dir"]
