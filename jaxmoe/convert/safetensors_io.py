"""Streaming HF safetensors reader and writer (one tensor in RAM at a time).

Format: 8-byte little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets}},
then the data buffer; offsets are relative to the buffer and must tile it without holes. Sharded
checkpoints add `model.safetensors.index.json` {"metadata": {"total_size"}, "weight_map": {key: file}}.

The reader opens every shard with `safetensors.safe_open` up front, so the whole checkpoint is validated
(files exist, index agrees with headers, every tensor's bytes lie inside its file) before any tensor is
read; when safetensors refuses a file, its header is read here to say which tensor and what is wrong.
Each tensor is then read alone with `get_tensor(key)` (`get_slice(key)[...]` fails on empty tensors in
safetensors 0.8). The writer plans the shards from a manifest, writes every header up front, accepts
tensors in any order (pwrite at their offsets), and publishes the directory only when every tensor has arrived.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Iterable, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names file, key and fix."""


def dtype_name(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise CheckpointError(f"dtype {dt} has no safetensors name; use one of {sorted(DTYPES)}")
    return _NAMES[dt]


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    file: str          # path of the shard

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_header(path: str) -> tuple[dict, int]:
    """-> (header dict without __metadata__, absolute offset of the data buffer). Used to explain a file
    safetensors refuses (it does not say which tensor is cut short)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is {len(raw)} bytes, too short for a safetensors "
                                      "header; the file is truncated or not safetensors")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} is implausible; not a safetensors file")
            text = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    if len(text) < n:
        raise CheckpointError(f"{path}: header declares {n} bytes but the file ends after "
                              f"{len(text)}; the file is truncated (re-download or re-convert it)")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; not a safetensors file")
    header.pop("__metadata__", None)
    return header, 8 + n


def read_json(path: str):
    """A checkpoint's JSON file; invalid JSON is one CheckpointError naming file and line (files are closed)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


class HFCheckpointReader:
    """Validated, lazy view of a HF safetensors checkpoint directory (single file or sharded)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"{self.dir}: not a directory; expected a HF checkpoint directory "
                                  f"with {SINGLE_NAME} or {INDEX_NAME}")
        index = os.path.join(self.dir, INDEX_NAME)
        single = os.path.join(self.dir, SINGLE_NAME)
        if os.path.exists(index):
            try:
                weight_map = read_json(index)["weight_map"]
            except KeyError:
                raise CheckpointError(f"{index}: has no `weight_map`; not a safetensors index") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise CheckpointError(f"{self.dir}: neither {SINGLE_NAME} nor {INDEX_NAME} found; "
                                  "not a HF safetensors checkpoint")
        self._specs: dict[str, TensorSpec] = {}
        for fname in files:
            path = os.path.join(self.dir, fname)
            if not os.path.exists(path):
                first = next(k for k, v in weight_map.items() if v == fname)
                raise CheckpointError(f"{index}: shard `{fname}` (holding e.g. `{first}`) does not "
                                      f"exist in {self.dir}; the download/copy is incomplete")
            self._add_file(path, fname, weight_map)
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self._specs:
                    raise CheckpointError(f"{index}: lists `{k}` in `{fname}`, but that file's header "
                                          "has no such tensor; the index and shards disagree")

    def _add_file(self, path: str, fname: str, weight_map: dict | None) -> None:
        try:
            with safe_open(path, framework="numpy") as f:
                found = {k: (sl.get_shape(), sl.get_dtype()) for k in f.keys() for sl in [f.get_slice(k)]}
        except SafetensorError as e:
            raise CheckpointError(_explain(path, e)) from None
        for key, (shape, dtype) in found.items():
            if weight_map is not None and weight_map.get(key) != fname:
                continue  # tensors not routed here by the index are ignored, like transformers
            if dtype not in DTYPES:
                raise CheckpointError(f"{path}: tensor `{key}` has unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
            if key in self._specs:
                raise CheckpointError(f"{path}: tensor `{key}` also appears in "
                                      f"{self._specs[key].file}; duplicate keys across shards")
            self._specs[key] = TensorSpec(tuple(int(d) for d in shape), DTYPES[dtype], path)

    def keys(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, key: str) -> bool:
        return key in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, key: str) -> TensorSpec:
        try:
            return self._specs[key]
        except KeyError:
            raise CheckpointError(f"{self.dir}: no tensor `{key}` in this checkpoint "
                                  f"({len(self._specs)} tensors)") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape for k, s in self._specs.items()}

    def get(self, key: str) -> np.ndarray:
        """Read exactly one tensor (the file is opened per call: nothing else of it stays mapped)."""
        sp = self.spec(key)
        with safe_open(sp.file, framework="numpy") as f:
            return f.get_tensor(key)


def _explain(path: str, err: Exception) -> str:
    """Why safetensors refused `path`, naming the tensor where the header says which."""
    header, base = read_header(path)
    size = os.path.getsize(path)
    for key, ent in header.items():
        if ent.get("dtype") not in DTYPES:
            return f"{path}: tensor `{key}` has unknown dtype {ent.get('dtype')!r}; known: {sorted(DTYPES)}"
        shape = tuple(int(d) for d in ent["shape"])
        s, e = (int(x) for x in ent["data_offsets"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[ent["dtype"]].itemsize
        if e - s != nbytes or s < 0:
            return (f"{path}: tensor `{key}` spans bytes [{s}, {e}) but shape {list(shape)} of {ent['dtype']} "
                    f"needs {nbytes}; corrupt header")
        if base + e > size:
            return (f"{path}: tensor `{key}` ends at byte {base + e} but the file has {size} bytes; the file is "
                    "truncated (re-download or re-convert)")
    return f"{path}: not a valid safetensors file ({err})"


class _Shard(NamedTuple):
    name: str
    header_len: int
    entries: dict       # key -> (absolute start, nbytes)


class HFCheckpointWriter:
    """Write a (sharded) safetensors checkpoint from a manifest; tensors may arrive in any order.

    Files are written under `<dir>.partial-<pid>` (or `<dir>/.partial-<pid>` when `dir` already exists)
    and moved into place by `close()` once every tensor has been written, index last, so an interrupted
    run never leaves something that looks like a complete checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, manifest: Iterable[tuple[str, tuple, object]],
                 max_shard_bytes: int = 5 * 1024 ** 3, metadata: dict | None = None):
        self.dir = os.fspath(directory)
        self._manifest = {}
        for key, shape, dtype in manifest:
            if key in self._manifest:
                raise CheckpointError(f"writer manifest for {self.dir}: `{key}` listed twice")
            self._manifest[key] = (tuple(int(d) for d in shape), np.dtype(dtype))
        if not self._manifest:
            raise CheckpointError(f"writer manifest for {self.dir} is empty")
        if os.path.isdir(self.dir):
            clash = [f for f in os.listdir(self.dir) if f.endswith(".safetensors") or f == INDEX_NAME]
            if clash:
                raise CheckpointError(f"{self.dir}: already holds {clash[0]}; choose an empty or new "
                                      "output directory")
            self._tmp, self._rename_dir = os.path.join(self.dir, f".partial-{os.getpid()}"), False
        else:
            self._tmp, self._rename_dir = f"{self.dir.rstrip(os.sep)}.partial-{os.getpid()}", True
        if os.path.exists(self._tmp):
            shutil.rmtree(self._tmp)
        os.makedirs(self._tmp)
        self._plan_shards(max_shard_bytes, metadata or {"format": "pt"})
        self._written: set[str] = set()
        self._fds: dict[str, int] = {}
        self._closed = False

    def _plan_shards(self, max_bytes: int, metadata: dict) -> None:
        groups: list[list[str]] = [[]]
        size = 0
        for key, (shape, dt) in self._manifest.items():
            nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if groups[-1] and size + nb > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += nb
        n = len(groups)
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # key -> (shard, start, nbytes)
        self.total_size = 0
        for i, keys in enumerate(groups):
            name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, off = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
            for k in keys:
                shape, dt = self._manifest[k]
                nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                header[k] = {"dtype": dtype_name(dt), "shape": list(shape), "data_offsets": [off, off + nb]}
                off += nb
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as safetensors does
            path = os.path.join(self._tmp, name)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(8 + len(raw) + off)
            base = 8 + len(raw)
            entries = {}
            for k in keys:
                s, e = header[k]["data_offsets"]
                entries[k] = (base + s, e - s)
                self._where[k] = (i, base + s, e - s)
            self._shards.append(_Shard(name, len(raw), entries))
            self.total_size += off

    def write(self, key: str, array) -> None:
        if self._closed:
            raise CheckpointError(f"{self.dir}: write(`{key}`) after close()")
        if key not in self._manifest:
            raise CheckpointError(f"{self.dir}: `{key}` is not in the writer's manifest; the converter "
                                  "produced a tensor the plan does not know")
        if key in self._written:
            raise CheckpointError(f"{self.dir}: `{key}` written twice")
        shape, dt = self._manifest[key]
        arr = np.asarray(array)
        if tuple(arr.shape) != shape or arr.dtype != dt:
            raise CheckpointError(f"{self.dir}: `{key}` arrived as {arr.dtype}{list(arr.shape)}, the "
                                  f"manifest says {dt}{list(shape)}; cast/reshape before writing")
        i, start, nbytes = self._where[key]
        name = self._shards[i].name
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(os.path.join(self._tmp, name), os.O_WRONLY)
        buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, buf[done:], start + done)
        self._written.add(key)

    def missing(self) -> list[str]:
        return [k for k in self._manifest if k not in self._written]

    def close(self) -> str:
        """Check completeness, write the index, publish the directory; returns its path."""
        if self._closed:
            return self.dir
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        miss = self.missing()
        if miss:
            self.abort()
            raise CheckpointError(f"{self.dir}: {len(miss)} tensor(s) never written, first `{miss[0]}`; "
                                  "nothing was published (the converter stopped early)")
        names = [s.name for s in self._shards]
        if len(names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: self._shards[i].name for k, (i, _, _) in sorted(self._where.items())}}
            with open(os.path.join(self._tmp, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            names.append(INDEX_NAME)
        if self._rename_dir:
            os.rename(self._tmp, self.dir)
        else:  # shards first, the file that makes it look complete (index / single file) last
            for name in names:
                os.rename(os.path.join(self._tmp, name), os.path.join(self.dir, name))
            os.rmdir(self._tmp)
        self._closed = True
        return self.dir

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "HFCheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
