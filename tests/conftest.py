"""Test configuration: simulated CPU devices, hypothesis profile, third-party kernels.

``XLA_FLAGS`` must be set before jax is imported, so it is done here, at the very top.
Set ``ATTN_JAX_KERNEL_MODULES=pkg.mod1,pkg.mod2`` to import modules that register extra
kernels: the conformance suite then checks them too.
"""

import importlib
import os

from tests.xla_flags import CHEAP_COMPILATION

# 8 simulated CPU devices for pmap / shard_map tests, and the cheaper LLVM pipeline.
_FLAGS = {"xla_force_host_platform_device_count": "8", **CHEAP_COMPILATION}
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_existing] + [f"--{k}={v}" for k, v in _FLAGS.items() if k not in _existing]
).strip()

# One persistent compilation cache per test run, shared by the xdist workers and by the
# launch.py subprocesses the tests start (they inherit the environment): identical programs
# (training steps, kernels under test in several files) compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="attn_jax_test_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

for _module in filter(None, os.environ.get("ATTN_JAX_KERNEL_MODULES", "").split(",")):
    importlib.import_module(_module.strip())


def pytest_terminal_summary(terminalreporter):
    """Prints the largest kernel error per dtype seen by the conformance suite."""
    from tests.kernels.conformance import MAX_ERRORS

    if MAX_ERRORS:
        terminalreporter.write_sep("-", "largest error vs float64 reference (this process)")
        for dtype, errs in MAX_ERRORS.items():
            terminalreporter.write_line(
                f"{dtype}: forward {errs['forward']:.3g}, gradient {errs['grad']:.3g}"
            )
