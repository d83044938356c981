"""scikit-learn's 8x8 digits with a Vision Transformer (2x2 patches: 16 tokens + CLS).

    python launch.py --config=configs/digits_vit.py:quick                     # CPU, minutes
    python launch.py --config=configs/digits_vit.py:quick --config.model.attention=linear

1,797 images, a stratified 80/20 split (``config.data.test_fraction``); training is
monitored on part of the test split (there is no validation split); the final evaluation
covers all of it.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.digits_data()
    common.digits_transformer(config, common.is_quick(arg, "configs/digits_vit.py"), 1_000)
    config.model.name = "vit"
    config.model.patch_size = 2
    return config
