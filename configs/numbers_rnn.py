"""English -> German number words ("twenty-one" -> "einundzwanzig") with the LSTM
sequence-to-sequence model: BLEU and exact match by input length, alignment heatmaps.

    python launch.py --config=configs/numbers_rnn.py:quick                  # CPU, ~5 minutes
    python launch.py --config=configs/numbers_rnn.py:quick --config.model.attention=none

``config.model.attention``: ``additive`` (Bahdanau), ``multiplicative`` (Luong) or ``none``
(the encoder's final state only: Bahdanau et al.'s RNNencdec).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.numbers_data()
    quick = common.is_quick(arg, "configs/numbers_rnn.py")
    common.rnn_seq2seq(config, quick, quick_steps=6_000)  # no attention learns slowly
    return config
