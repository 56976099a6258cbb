"""Orbax checkpoints of a training run: train state (params, optimizer, router bias, counters), data
iterator state and run metadata (resolved configs, consumed samples) in one step directory.

Saves are async and atomic (orbax writes a temporary directory and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest valid one. Restores take target shardings,
so a run can resume on a different mesh. Once a save has committed, a manifest of per-file sizes and CRC32s
is written into the step; restores check it and fall back to the newest intact step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxmoe.config import ConfigError, ModelConfig


MANIFEST = "jaxmoe_manifest.json"  # per-file sizes + CRC32 of a step, written once orbax has committed it
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
            if jax.process_index() == 0:
                for step in self._unsealed:
                    d = os.path.join(self.directory, str(step))
                    if os.path.isdir(d):  # max_to_keep may have removed it already
                        write_manifest(d)
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
            good = [s for s in complete_steps(self.directory) if s != step and verify_step(
                os.path.join(self.directory, str(s)))[0] is None]
            keep = f"the last complete checkpoint is {self.directory}/{good[0]}" if good else "no complete checkpoint"
            raise SaveError(f"saving checkpoint {step} in {self.directory} failed ({type(e).__name__}: {first}); "
                            f"training stopped; {keep}") from None


def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _step_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(step_dir: str) -> None:
    files = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
             for f in _step_files(step_dir)}
    dump_json(os.path.join(step_dir, MANIFEST), {"version": 1, "files": files})


def verify_step(step_dir: str) -> tuple[str | None, bool]:
    """-> (what is wrong with the step or None, whether its data-loader state is missing). A step without a
    manifest (older jaxmoe, or killed between commit and manifest) passes unverified."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None, not os.path.isdir(os.path.join(step_dir, "data"))
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable {MANIFEST}: {e}", False
    data_missing = not os.path.isdir(os.path.join(step_dir, "data"))
    for rel, (size, crc) in files.items():
        f = os.path.join(step_dir, rel)
        if data_missing and rel.startswith("data" + os.sep):
            continue
        if not os.path.isfile(f):
            return f"{rel} is missing", data_missing
        if os.path.getsize(f) != size:
            return f"{rel} has {os.path.getsize(f)} bytes, {size} when saved", data_missing
        if _crc32(f) != crc:
            return f"{rel} differs from what was saved (CRC32 {_crc32(f)} != {crc})", data_missing
    return None, data_missing


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
