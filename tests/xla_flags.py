"""``XLA_FLAGS`` for the test processes and the launch.py subprocesses they start: a cheaper
LLVM pipeline (the suite compiles hundreds of tiny programs and never times them)."""

from __future__ import annotations

CHEAP_COMPILATION = {
    "xla_backend_optimization_level": "0",
    "xla_llvm_disable_expensive_passes": "true",
}


def xla_flags(devices: int | None = None) -> str:
    """The flags, with ``devices`` simulated CPU devices (``None``: XLA's default, one)."""
    flags = dict(CHEAP_COMPILATION)
    if devices is not None:
        flags["xla_force_host_platform_device_count"] = str(devices)
    return " ".join(f"--{k}={v}" for k, v in flags.items())
