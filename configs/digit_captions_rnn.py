"""Cross-modal attention: captioning strips of 3-6 digits with an LSTM decoder attending
over the strip's patch features with additive (Bahdanau) attention, "show, attend and tell"
style (a 3x3 convolution, 4x4 patches, no recurrent encoder).

    python launch.py --config=configs/digit_captions_rnn.py:quick             # CPU, minutes
    python launch.py --config=configs/digit_captions_rnn.py:quick --config.model.encoder_cell=lstm

The data and evaluation are those of ``configs/digit_captions_vit.py``.
"""

import ml_collections

from configs import common
from configs.digit_captions_vit import captions_data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    quick = common.is_quick(arg, "configs/digit_captions_rnn.py")
    config = common.base_config()
    config.data = captions_data(quick)
    config.model = common.model_config()
    config.model.name = "seq2seq_rnn"
    config.model.patch_size = 4
    config.model.conv_channels = (32,)  # 3x3 ReLU convolutions before the patches
    config.model.patch_positions = "learned"
    config.model.encoder_cell = "none"  # the memory is the patch features ("none") or an RNN's
    config.model.bidirectional = False
    config.model.attention = "additive"  # additive | multiplicative | dot_product | none
    config.model.embed_dim = 64 if quick else 128
    config.model.hidden_dim = 128 if quick else 256
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.train.steps = 2_000 if quick else 10_000
    config.train.batch_size = 64 if quick else 128
    config.train.eval_every = config.train.checkpoint_every = 500 if quick else 1_000
    return config
