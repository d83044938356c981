"""Kernel demo: every registered kernel on one small problem, vs the float64 reference.

python launch.py --config=configs/kernel_demo.py            # all kernels, length 128
python launch.py --config=configs/kernel_demo.py:quick      # length 32
python launch.py --config=configs/kernel_demo.py:seq_len=64 # named arguments
python launch.py --config.kernels=dot_product,additive --config.dtype=bfloat16
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: named arguments (``configs.common.parse_arg``): ``quick`` (a tiny
    problem), ``seq_len=N``."""
    config = ml_collections.ConfigDict()
    config.task = "kernel_demo"
    config.kernels = ""  # comma-separated registry names; empty = every registered kernel
    config.batch = 2
    config.seq_len = 128
    config.dtype = "float32"
    args = common.parse_arg(arg, "configs/kernel_demo.py", quick=False, seq_len=(None, int))
    if args.quick:
        config.seq_len = 32
    if args.seq_len is not None:
        config.seq_len = args.seq_len
    return config
