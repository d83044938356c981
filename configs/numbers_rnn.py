"""English -> German number words ("twenty-one" -> "einundzwanzig") with the LSTM
sequence-to-sequence model: BLEU and exact match by input length, alignment heatmaps.

    python launch.py --config=configs/numbers_rnn.py:quick                  # CPU, minutes
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
    config.model = ml_collections.ConfigDict()
    config.model.name = "seq2seq_rnn"
    config.model.attention = "additive"
    config.model.score = "general"
    config.model.encoder_cell = "lstm"
    config.model.bidirectional = True
    config.model.embed_dim = 128
    config.model.hidden_dim = 256

    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.train.steps = 10_000
    config.train.batch_size = 128
    config.train.eval_every = 1_000
    config.train.checkpoint_every = 1_000
    if common.is_quick(arg, "configs/numbers_rnn.py"):
        config.model.embed_dim = 64
        config.model.hidden_dim = 128
        config.train.steps = 1_500
        config.train.batch_size = 64
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    return config
