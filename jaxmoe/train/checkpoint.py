"""Orbax checkpoints of a training run: train state (params, optimizer, router bias, counters), data
iterator state and run metadata (resolved configs, consumed samples) in one step directory.

Saves are async and atomic (orbax writes a temporary directory and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest valid one. Restores take target shardings,
so a run can resume on a different mesh. Once a save has committed, a manifest of per-file sizes and CRC32s
is written into the step; restores check it and fall back to the newest intact step.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxmoe.config import ConfigError, ModelConfig


MANIFEST = "jaxmoe_manifest.json"  # per-file sizes + CRC32s of a step, written once orbax has committed it
CRC_CHUNK = 64 << 20  # bytes per CRC32 in the manifest: the unit of parallel work when writing / verifying
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's unfinished-save directories (a run killed mid-save)


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): the run stops with one message."""


class _QuietOrbaxErrors(logging.Filter):
    """orbax logs a failed save (with its traceback) before raising it; the SaveError says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                            create=True)
        self.mgr = ocp.CheckpointManager(self.directory, options=opts)
        absl_logger = logging.getLogger("absl")
        if not any(isinstance(f, _QuietOrbaxErrors) for f in absl_logger.filters):
            absl_logger.addFilter(_QuietOrbaxErrors())
        self._unsealed: list[int] = []  # steps saved by this run whose manifest is not written yet
        self.failed = False

    def save(self, step: int, train_state: dict, data_state: dict | None, meta: dict) -> None:
        items = {"state": ocp.args.StandardSave(train_state), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self.wait()  # the previous save is complete (and sealed) before this one starts
        with self._failing(step):
            self.mgr.save(step, args=ocp.args.Composite(**items))
        self._unsealed.append(step)

    def wait(self) -> None:
        with self._failing(self._unsealed[-1] if self._unsealed else None):
            self.mgr.wait_until_finished()
            for step in self._unsealed:
                d = os.path.join(self.directory, str(step))
                if os.path.isdir(d):  # max_to_keep may have removed it already
                    write_manifest(d, jax.process_index(), jax.process_count())
        self._unsealed = []

    def check(self) -> None:
        """Raise a failed background save now (each step), not at the next save a --save_interval later."""
        if self._unsealed:
            with self._failing(self._unsealed[-1]):
                self.mgr.check_for_errors()

    def close(self) -> None:
        try:
            if not self.failed:
                self.wait()
        finally:
            self.mgr.close()

    @contextlib.contextmanager
    def _failing(self, step):
        """Any error of a save (orbax raises it at the save or at the next wait) -> one SaveError."""
        try:
            yield
        except Exception as e:
            self.failed = True
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            good = [s for s in complete_steps(self.directory) if s != step and verify_step(  # sizes: no collective
                os.path.join(self.directory, str(s)), contents=False)[0] is None]
            keep = f"the last complete checkpoint is {self.directory}/{good[0]}" if good else "no complete checkpoint"
            raise SaveError(f"saving checkpoint {step} in {self.directory} failed ({type(e).__name__}: {first}); "
                            f"training stopped; {keep}") from None


def _chunk_crcs(step_dir: str, files: list[str], chunk: int) -> dict[str, list[str]]:
    """{file: [CRC32 of each `chunk` bytes]}: the chunks of all files go through a thread pool (zlib.crc32
    releases the GIL, so the threads use every core and keep several reads in flight)."""
    jobs = [(f, off) for f in files for off in range(0, max(os.path.getsize(os.path.join(step_dir, f)), 1), chunk)]

    def crc(job):
        c, left = 0, chunk
        with open(os.path.join(step_dir, job[0]), "rb") as fh:
            fh.seek(job[1])
            while left > 0 and (b := fh.read(min(left, 8 << 20))):  # 8 MiB reads: bounded memory per thread
                c, left = zlib.crc32(b, c), left - len(b)
        return f"{c:08x}"

    with concurrent.futures.ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
        crcs = list(pool.map(crc, jobs))
    out: dict[str, list[str]] = {f: [] for f in files}
    for (f, _), c in zip(jobs, crcs):
        out[f].append(c)
    return out


def _step_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
    return sorted(f for f in out if not f.startswith("jaxmoe_manifest"))


def _share_path(step_dir: str, process: int) -> str:
    return os.path.join(step_dir, MANIFEST if process == 0 else f"jaxmoe_manifest.{process}.json")


def write_manifest(step_dir: str, process: int = 0, processes: int = 1) -> None:
    """Process i of n records the CRC32s of files i::n of the committed step (the listing is the same on every
    process); process 0 also records every file's size, the cheap check that covers all files."""
    files = _step_files(step_dir)
    share = {"version": 2, "chunk_bytes": CRC_CHUNK, "crc32": _chunk_crcs(step_dir, files[process::processes],
                                                                          CRC_CHUNK)}
    if process == 0:
        share["sizes"] = {f: os.path.getsize(os.path.join(step_dir, f)) for f in files}
    dump_json(_share_path(step_dir, process), share)


def _read_manifest(step_dir: str) -> tuple[dict, int, dict[str, list[str]]]:
    """-> (sizes, chunk bytes, CRC32 lists of the shares present). A share missing (a process killed before it
    wrote it) leaves its files' contents unverified; their sizes are still checked."""
    with open(_share_path(step_dir, 0)) as f:
        head = json.load(f)
    if head.get("version") != 2:  # version 1 (one CRC over each whole file): its sizes are checked
        return {k: v[0] for k, v in head["files"].items()}, CRC_CHUNK, {}
    crcs = dict(head["crc32"])
    for name in os.listdir(step_dir):
        if name.startswith("jaxmoe_manifest.") and name != MANIFEST:
            with open(os.path.join(step_dir, name)) as f:
                crcs.update(json.load(f)["crc32"])
    return head["sizes"], head["chunk_bytes"], crcs


def _file_problem(step_dir: str, rel: str, size: int, crcs: list[str] | None, chunk: int) -> str | None:
    f = os.path.join(step_dir, rel)
    if not os.path.isfile(f):
        return f"{rel} is missing"
    if os.path.getsize(f) != size:
        return f"{rel} has {os.path.getsize(f)} bytes, {size} when saved"
    if crcs is not None:
        now = _chunk_crcs(step_dir, [rel], chunk)[rel]
        bad = [i for i, (a, b) in enumerate(zip(now, crcs)) if a != b]
        if bad:
            return (f"{rel} differs from what was saved (CRC32 of bytes {bad[0] * chunk}-"
                    f"{min(size, (bad[0] + 1) * chunk)}: {now[bad[0]]} != {crcs[bad[0]]})")
    return None


def verify_step(step_dir: str, contents: bool = True) -> tuple[str | None, bool]:
    """-> (what is wrong with the step or None, whether its data-loader state is missing). Sizes of all files
    are checked; with `contents`, process i of n also reads files i::n for their CRC32s and the processes agree
    on the first damaged file. A step without a manifest (older jaxmoe, or killed between commit and manifest)
    passes unverified."""
    data_missing = not os.path.isdir(os.path.join(step_dir, "data"))
    if not os.path.isfile(_share_path(step_dir, 0)):
        return None, data_missing
    try:
        sizes, chunk, crcs = _read_manifest(step_dir)
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"unreadable {MANIFEST}: {e}", data_missing
    files = sorted(f for f in sizes if not (data_missing and f.startswith("data" + os.sep)))
    first_bad = next((i for i, f in enumerate(files) if _file_problem(step_dir, f, sizes[f], None, chunk)), None)
    if first_bad is None and contents:
        n, i = jax.process_count(), jax.process_index()
        mine = [k for k in range(i, len(files), n) if files[k] in crcs]
        now = _chunk_crcs(step_dir, [files[k] for k in mine], chunk)
        first_bad = next((k for k in mine if now[files[k]] != crcs[files[k]]), None)
        if n > 1:  # the same answer on every process: the first damaged file any of them found
            found = multihost_utils.process_allgather(np.int32(len(files) if first_bad is None else first_bad))
            first_bad = None if int(np.min(found)) == len(files) else int(np.min(found))
    if first_bad is None:
        return None, data_missing
    f = files[first_bad]
    return _file_problem(step_dir, f, sizes[f], crcs.get(f) if contents else None, chunk), data_missing


def complete_steps(directory: str) -> list[int]:
    """Committed steps, newest first (orbax ignores unfinished tmp dirs)."""
    if not os.path.isdir(directory):
        return []
    mgr = ocp.CheckpointManager(os.path.abspath(directory))
    try:
        return sorted(mgr.all_steps(), reverse=True)
    finally:
        mgr.close()


def leftover_tmp_dirs(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if TMP_SUFFIX in n) if os.path.isdir(directory) else []


def pick_step(directory: str, warn) -> int | None:
    """The newest step that passes verification; damaged ones are reported through `warn` and skipped.
    None when the directory holds no committed step; an error when every step is damaged."""
    steps = complete_steps(directory)
    for step in steps:
        problem, _ = verify_step(os.path.join(directory, str(step)))
        if problem is None:
            return step
        warn(f"warning: checkpoint {directory}/{step} is damaged ({problem}); trying the previous step")
    if steps:
        raise ConfigError(f"--load {directory}: every checkpoint ({', '.join(map(str, steps))}) is damaged; "
                          "restore the directory from a backup or start a new run with a new --save")
    return None


def latest_step(directory: str) -> int | None:
    mgr = ocp.CheckpointManager(os.path.abspath(directory))
    try:
        return mgr.latest_step()
    finally:
        mgr.close()


def is_checkpoint_dir(directory: str) -> bool:
    return os.path.isdir(directory) and latest_step(directory) is not None


def read_meta(directory: str, step: int | None = None) -> dict:
    mgr = ocp.CheckpointManager(os.path.abspath(directory))
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"--load {directory}: no complete checkpoint found")
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mgr.close()


def restore(directory: str, abstract_state: dict, step: int | None = None, partial: bool = False
            ) -> tuple[dict, dict | None, dict]:
    """-> (train_state, data_state or None, meta). `abstract_state` holds jax.ShapeDtypeStruct leaves with the
    target shardings. `partial` restores only the subtrees present in abstract_state (weights only)."""
    directory = os.path.abspath(directory)
    mgr = ocp.CheckpointManager(directory)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"--load {directory}: no complete checkpoint found (expected <dir>/<step>/ written by "
                              "jaxmoe.train --save)")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if partial:
            restore_args = ocp.args.PyTreeRestore(
                item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                partial_restore=True)
        else:
            restore_args = ocp.args.StandardRestore(abstract_state)
        items = {"state": restore_args}
        has_data = os.path.isdir(os.path.join(directory, str(step), "data"))
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        try:
            out = mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # an unverified step (no manifest) that orbax cannot read
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"--load {directory}: step {step} cannot be read ({type(e).__name__}: {first}); move "
                              f"{directory}/{step} aside to resume from the previous step") from None
        return out["state"], (out["data"] if has_data else None), meta
    finally:
        mgr.close()


def model_config_from_meta(meta: dict) -> ModelConfig:
    return ModelConfig.from_hf_dict(meta["model_config"], where="checkpoint meta")


def make_meta(model_cfg: ModelConfig, train_cfg: Any, iteration: int, consumed_samples: int,
              extra: dict | None = None) -> dict:
    return {"model_config": model_cfg.to_hf_dict(), "train_config": dataclasses.asdict(train_cfg),
            "iteration": iteration, "consumed_samples": consumed_samples, **(extra or {})}


def abstract_like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def dump_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
