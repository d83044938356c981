"""Sequential-pixel classification of scikit-learn's 8x8 digits: a Transformer encoder
reads the 64 pixel intensities (17 levels) in raster order, with a CLS token.

    python launch.py --config=configs/digits_pixels.py:quick                  # CPU, minutes
    python launch.py --config=configs/digits_pixels.py:quick --config.model.attention=performer
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.digits_data()
    config.model = ml_collections.ConfigDict()
    config.model.name = "encoder"
    config.model.pooling = "cls"
    config.model.attention = "dot_product"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 192
    config.model.num_layers = 6
    config.model.num_heads = 3
    config.model.mlp_dim = 768
    config.model.positions = "learned"
    config.model.dropout_rate = 0.1

    config.optim.weight_decay = 0.05
    config.train.steps = 5_000
    config.train.batch_size = 64
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    if common.is_quick(arg, "configs/digits_pixels.py"):
        config.model.width = 64
        config.model.num_layers = 2
        config.model.num_heads = 4
        config.model.mlp_dim = 128
        config.train.steps = 1_500
        config.train.eval_every = 250
        config.train.checkpoint_every = 250
    return config
