"""Cross-modal attention: captioning strips of 3-6 digits ("seven two nine") with a ViT
encoder over 4x4 patches and a Transformer decoder cross-attending to them.

    python launch.py --config=configs/digit_captions_vit.py:quick             # CPU, minutes
    python launch.py --config=configs/digit_captions_vit.py:quick --config.data.beam_size=8

Train strips have 3-5 digits (train images), test strips 3-6 (test images), validation
strips 3-5 (train images that no train strip uses; they monitor training); the final
evaluation decodes every test strip greedily and with beam search (exact match, BLEU, word
accuracy by strip length), and ``attention/`` shows each generated word's cross-attention
over the strip.
"""

import ml_collections

from configs import common


def captions_data(quick: bool) -> ml_collections.ConfigDict:
    """``config.data`` of the digit-strip captions (``attn_jax.data.digit_strips``)."""
    data = common.data_config()
    data.name = "digit_captions"
    data.num_train = 20_000 if quick else 100_000  # strips of 1,293 of the 1,437 train images
    data.num_test = 1_000  # strips of the 360 test images
    data.num_eval = 512  # validation strips (3-5 digits) scored while training
    data.valid_fraction = 0.1  # train images held out for them (144; 1,293 train the model)
    data.min_digits = 3
    data.max_train_digits = 5
    data.max_test_digits = 6  # the canvas: 8 x 48 pixels
    data.test_fraction = 0.2  # the digits' image split (1,437 / 360)
    data.beam_size = 4  # final evaluation: greedy and beam search
    data.beam_alpha = 0.6
    data.num_plotted = 3  # test strips drawn (one of each of the longest lengths)
    return data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    quick = common.is_quick(arg, "configs/digit_captions_vit.py")
    config = common.base_config()
    config.data = captions_data(quick)
    config.model = common.model_config()
    config.model.name = "encoder_decoder"
    config.model.patch_size = 4  # 2 x 12 patches
    config.model.conv_channels = ()
    config.model.patch_positions = "learned"
    config.model.attention = "auto"
    config.model.attention_kwargs = None
    config.model.width = 64 if quick else 128
    config.model.num_layers = 2 if quick else 4  # encoder and decoder each
    config.model.num_heads = 4
    config.model.mlp_dim = 2 * config.model.width if quick else 4 * config.model.width
    config.model.positions = "sinusoidal"  # the decoder's (the patches have their own)
    config.model.scan_layers = False
    config.model.remat = "none"
    config.model.dropout_rate = 0.0 if quick else 0.1
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.train.steps = 2_000 if quick else 10_000
    config.train.batch_size = 64 if quick else 128
    config.train.eval_every = config.train.checkpoint_every = 500 if quick else 1_000
    return config
