"""Rewrite the golden sharding tables (tests/golden/shardings/*.txt) from the current logical-axis table.

    python tests/golden/regen_shardings.py

Run it after an intended sharding change and commit the diff with the change; tests/test_sharding_golden.py
fails on any parameter whose PartitionSpec differs from these files.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.sharding_tables import LAYOUTS, write_golden  # noqa: E402

if __name__ == "__main__":
    for name in LAYOUTS:
        print(write_golden(name))
