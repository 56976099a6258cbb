"""Throughput of the checkpoint manifest's CRC32 (jaxmoe/train/checkpoint.py) on one file of --gb GiB:
one thread over the whole file (the manifest's old way) vs the chunks through the thread pool (what a save and a
restore do now). The file is written first, so it is read from the page cache: this measures the CRC, not the
disk; a cold read runs at the slower of the two.

    python scripts/bench_manifest.py --gb 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.train.checkpoint import CRC_CHUNK, _chunk_crcs  # noqa: E402


def one_thread(path: str) -> None:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="file size in GiB (default 1)")
    p.add_argument("--dir", default=None, help="where to write the file (default: the system temp dir)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path, size = os.path.join(d, "blob"), int(a.gb * 2**30)
        with open(path, "wb") as f:
            for _ in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - f.tell())))
        for name, fn in (("one thread", lambda: one_thread(path)),
                         (f"chunks of {CRC_CHUNK >> 20} MiB, {min(16, 2 * (os.cpu_count() or 1))} threads",
                          lambda: _chunk_crcs(d, ["blob"], CRC_CHUNK))):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            print(f"{name}: {size / 1e6 / dt:.0f} MB/s ({size / 2**30:.2f} GiB in {dt:.2f} s, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
