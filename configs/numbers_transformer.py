"""English -> German number words with the Transformer encoder-decoder (cross-attention
alignment heatmaps per layer and head).

    python launch.py --config=configs/numbers_transformer.py:quick          # CPU, minutes
    python launch.py --config=configs/numbers_transformer.py:quick --config.model.attention=flash
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.numbers_data()
    quick = common.is_quick(arg, "configs/numbers_transformer.py")
    common.transformer_seq2seq(config, quick, quick_steps=1_500)
    return config
