"""Batch placement: host rows -> the global batch sharded as the train step reads it (rows over the data /
expert ranks, tokens over `sequence` in the load-balanced context-parallel order), and which rows each
process loads."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxmoe.mesh import MeshError
from jaxmoe.parallel.context import permute_batch


@dataclasses.dataclass(frozen=True)
class BatchPlacement:
    sharding: NamedSharding  # of every [G, T] batch field: logical axes (batch, length_attn)
    data_parallel_size: int  # the ranks that split the rows (data x expert)
    sequence: int  # context-parallel ranks: > 1 permutes the tokens (parallel/context.py)
    mtp_depths: int = 0  # MTP label shifts precomputed on the host under context parallelism
    layout: str = ""  # the --mesh it belongs to, for error messages

    def host_fields(self, batch: dict) -> dict:
        """The host batch in the order the step reads (load-balanced chunks, token_index, MTP shifts)."""
        return permute_batch(batch, self.sequence, self.mtp_depths) if self.sequence > 1 else batch

    def process_shard(self) -> tuple[int, int]:
        """(index, count): this process loads rows [index*G/count, (index+1)*G/count) of each global batch of
        G rows, the rows its own devices hold under `sharding`. count is the number of distinct row blocks
        over processes (1 when every process holds the whole batch, e.g. tp spanning processes)."""
        dp = self.data_parallel_size
        mesh_size = self.sharding.mesh.devices.size
        rows = sorted({(s[0].start or 0, dp if s[0].stop is None else s[0].stop)
                       for s in self.sharding.addressable_devices_indices_map(
                           (dp, mesh_size)).values()})  # a length every axis splitting it divides
        lo = hi = rows[0][0]
        for a, b in rows:
            if a > hi:
                break
            hi = max(hi, b)
        n = hi - lo
        if hi < rows[-1][1] or dp % n or lo % n:
            raise MeshError(f"--mesh {self.layout}: process {jax.process_index()} holds batch rows {rows} of "
                            f"{dp} data ranks, not one aligned block; order the devices so that each process "
                            "owns whole data/expert ranks")
        return lo // n, dp // n

    def put(self, batch: dict) -> dict:
        """Process-local rows (see process_shard) -> global arrays with the batch sharding."""
        batch, sh = self.host_fields(batch), self.sharding
        if jax.process_count() == 1:
            return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}
        count = self.process_shard()[1]
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(v), (v.shape[0] * count,) + v.shape[1:])
                for k, v in batch.items()}
