"""Copy task for a decoder LM, with length generalisation: train on sequences of 1-16
symbols, evaluate copying 16, 32 and 64 (``final_metrics.json``: ``accuracy@L``).

    python launch.py --config=configs/copy.py:quick                           # CPU, minutes
    python launch.py --config=configs/copy.py:quick --config.model.positions=none

Positions default to RoPE; learned positions cannot encode positions beyond the training
lengths (their rows there stay at initialisation), which is the point of comparing them.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "copy"
    common.lm_packing(config.data)
    config.data.num_symbols = 16
    config.data.min_len = 1
    config.data.max_len = 32
    config.data.num_train = 100_000
    config.data.num_eval = 1_024
    config.data.num_final = 1_024  # examples per evaluated length
    config.data.eval_lengths = [32, 64, 128]
    config.model = common.lm_model()
    config.model.width = 256
    config.model.num_layers = 4
    config.model.num_heads = 8

    config.train.steps = 10_000
    config.train.batch_size = 128
    config.train.eval_every = 1_000
    config.train.checkpoint_every = 1_000
    if common.is_quick(arg, "configs/copy.py"):
        config.data.max_len = 16
        config.data.num_train = 20_000
        config.data.num_eval = 512
        config.data.num_final = 512
        config.data.eval_lengths = [16, 32, 64]
        config.model = common.lm_model()
        config.train.steps = 1_500
        config.train.batch_size = 64
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    return config
