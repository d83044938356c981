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
    quick = common.is_quick(arg, "configs/scan_transformer.py")
    common.transformer_seq2seq(config, quick, quick_steps=3_000)
    return config
