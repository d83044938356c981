"""SCAN (Lake & Baroni 2018) with the Transformer encoder-decoder.

    python launch.py --config=configs/scan_transformer.py:quick                 # CPU, minutes
    python launch.py --config=configs/scan_transformer.py --config.data.split=length
    python launch.py --config=configs/scan_transformer.py:quick --config.model.attention=flash

``config.data.split``: ``simple``, ``length`` or ``addprim_jump``; any ``dot_product``
kernel in ``config.model.attention``. Sinusoidal positions, so positions beyond the
training lengths (the length split) still have an encoding.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.scan_data()
    config.model = ml_collections.ConfigDict()
    config.model.name = "encoder_decoder"
    config.model.attention = "dot_product"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 128
    config.model.num_layers = 3
    config.model.num_heads = 4
    config.model.mlp_dim = 512
    config.model.positions = "sinusoidal"
    config.model.dropout_rate = 0.1

    config.optim.learning_rate = 5e-4
    config.optim.weight_decay = 0.0
    config.train.steps = 10_000
    config.train.batch_size = 128
    config.train.eval_every = 1_000
    config.train.checkpoint_every = 1_000
    if common.is_quick(arg, "configs/scan_transformer.py"):
        config.model.width = 64
        config.model.num_layers = 2
        config.model.mlp_dim = 256
        config.model.dropout_rate = 0.0
        config.optim.learning_rate = 1e-3
        config.train.steps = 3_000
        config.train.batch_size = 64
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    return config
