"""Kernel demo: every registered kernel on one small problem, vs the float64 reference.

python launch.py --config=configs/kernel_demo.py            # all kernels, length 128
python launch.py --config=configs/kernel_demo.py:quick      # length 32
python launch.py --config.kernels=dot_product,additive --config.dtype=bfloat16
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``None`` (default sizes) or ``"quick"`` (a tiny problem)."""
    config = ml_collections.ConfigDict()
    config.task = "kernel_demo"
    config.kernels = ""  # comma-separated registry names; empty = every registered kernel
    config.batch = 2
    config.seq_len = 128
    config.dtype = "float32"
    if arg == "quick":
        config.seq_len = 32
    elif arg is not None:
        raise ValueError(f"configs/kernel_demo.py: unknown variant {arg!r}; expected 'quick'")
    return config
