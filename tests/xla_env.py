"""XLA flags of every process the suite starts (imports nothing: conftest needs it before jax loads).

The suite's programs are tiny and each is compiled once or twice, so compile time, not run time, is what the
suite spends: LLVM at -O0 (`--xla_backend_optimization_level=0`) compiles the CPU train steps ~40% faster
(tests/test_pipeline.py pp4-uneven, cold cache: 67 s -> 43 s). XLA's own HLO passes (fusion, SPMD partitioning,
collectives) are unchanged, so the numerics checked are the same programs'."""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """`devices` fake CPU devices, compiled fast."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
