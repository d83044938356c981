"""``XLA_FLAGS`` for the test processes and the launch.py subprocesses they start: a cheaper
compilation pipeline (the suite compiles hundreds of tiny programs and never times them).

XLA:CPU's elemental emitters instead of its MLIR fusion emitters compile the suite's small
programs in about 60% of the time (a model-zoo test: 12.9 s -> 7.8 s); XLA's own ("ynn")
fusions stay on, so the chunked-vmap crash regression in tests/kernels/test_vmap.py still
reproduces under these flags.
"""

from __future__ import annotations

CHEAP_COMPILATION = {
    "xla_backend_optimization_level": "0",
    "xla_llvm_disable_expensive_passes": "true",
    "xla_cpu_use_fusion_emitters": "false",
}


def xla_flags(devices: int | None = None) -> str:
    """The flags, with ``devices`` simulated CPU devices (``None``: XLA's default, one)."""
    flags = dict(CHEAP_COMPILATION)
    if devices is not None:
        flags["xla_force_host_platform_device_count"] = str(devices)
    return " ".join(f"--{k}={v}" for k, v in flags.items())
