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
    common.digits_transformer(config, common.is_quick(arg, "configs/digits_pixels.py"), 1_500)
    config.model.name = "encoder"
    return config
