"""SCAN (Lake & Baroni 2018) with the LSTM sequence-to-sequence model.

    python launch.py --config=configs/scan_rnn.py:quick                     # CPU, minutes
    python launch.py --config=configs/scan_rnn.py --config.data.split=length # accelerator
    python launch.py --config=configs/scan_rnn.py:quick --config.model.attention=none

``config.data.split``: ``simple``, ``length`` or ``addprim_jump``. ``config.model.attention``:
``additive`` (Bahdanau), ``multiplicative`` (Luong, ``config.model.score`` ``general`` or
``dot``) or ``none``. The final evaluation greedily decodes the whole test split: exact
match overall and by action-sequence length.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, minutes), or ``None`` / ``"full"`` (sized for an accelerator)."""
    config = common.base_config()
    config.data = common.scan_data()
    common.rnn_seq2seq(config, common.is_quick(arg, "configs/scan_rnn.py"), quick_steps=2_000)
    return config
