"""ListOps (Long Range Arena) with a Transformer encoder classifier.

    python launch.py --config=configs/listops.py:quick                        # CPU, minutes
    python launch.py --config=configs/listops.py:quick --config.model.attention=linear
    python launch.py --config=configs/listops.py         # LRA's lengths (500-2000), accelerator

Expressions of nested MAX, MIN, MED and SM (sum mod 10) over digits, generated as in LRA
(depth <= 10, <= 10 arguments per operator); the label is the expression's value. The full
variant uses LRA's sizes (96,000 / 2,000 / 2,000 examples, lengths strictly between 500
and 2,000, the Transformer of LRA's ListOps config); ``:quick`` shortens the expressions to
32-128 tokens so it trains on a CPU.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (LRA-sized, accelerator)."""
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "listops"
    config.data.max_depth = 10
    config.data.max_args = 10
    config.data.min_length = 501  # LRA keeps 500 < length < 2000
    config.data.max_length = 1_999
    config.data.num_train = 96_000
    config.data.num_valid = 2_000
    config.data.num_test = 2_000
    config.data.num_eval = 1_984  # validation examples evaluated while training

    config.model = common.model_config()
    config.model.name = "encoder"
    config.model.pooling = "cls"
    config.model.attention = "auto"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 512
    config.model.num_layers = 6
    config.model.num_heads = 8
    config.model.mlp_dim = 2048
    config.model.positions = "learned"
    config.model.scan_layers = False  # True: one nn.scan over the layers
    config.model.remat = "none"  # or "full", "dots", "dots_with_no_batch_dims"
    config.model.dropout_rate = 0.1

    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 1_000
    config.train.steps = 5_000
    config.train.batch_size = 32
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    if common.is_quick(arg, "configs/listops.py"):
        config.data.min_length = 32
        config.data.max_length = 128
        config.data.num_train = 20_000
        config.data.num_valid = 1_024
        config.data.num_eval = 1_024
        config.model.width = 64
        config.model.num_layers = 2
        config.model.num_heads = 4
        config.model.mlp_dim = 128
        config.model.dropout_rate = 0.0
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 100
        config.train.steps = 2_000
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    return config
