"""Induction heads (the H3 synthetic task) for a decoder LM: after a trigger token, recall
the symbol that followed its earlier occurrence. Trains at length 32 (CPU) / 64 and
evaluates at longer lengths (``final_metrics.json``: ``accuracy@L``).

    python launch.py --config=configs/induction.py:quick                      # CPU, minutes
    python launch.py --config=configs/induction.py:quick --config.model.attention=linear
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "induction"
    common.lm_packing(config.data)
    config.data.num_symbols = 16
    config.data.seq_len = 64
    config.data.num_train = 100_000
    config.data.num_eval = 1_024
    config.data.num_final = 1_024  # examples per evaluated length
    config.data.eval_lengths = [64, 128, 256, 512]
    config.model = common.lm_model()
    config.model.width = 256
    config.model.num_layers = 4
    config.model.num_heads = 8

    config.train.steps = 10_000
    config.train.batch_size = 128
    config.train.eval_every = 1_000
    config.train.checkpoint_every = 1_000
    if common.is_quick(arg, "configs/induction.py"):
        config.data.seq_len = 32
        config.data.num_train = 20_000
        config.data.num_eval = 512
        config.data.num_final = 512
        config.data.eval_lengths = [32, 64, 128, 256]
        config.model = common.lm_model()
        config.train.steps = 1_500
        config.train.batch_size = 64
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    return config
