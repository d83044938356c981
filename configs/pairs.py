"""Sequence-to-sequence on your own TSV files (``source<TAB>target`` per line).

    python launch.py --config=configs/pairs.py:quick                     # the sample, CPU
    python launch.py --config=configs/pairs.py:quick,rnn                 # LSTM + attention
    python launch.py --config=configs/pairs.py --config.data.train_files=train.tsv \\
        --config.data.eval_files=dev.tsv --config.data.tokenize=whitespace

Tokens are characters (``config.data.tokenize="char"``, spaces included) or
whitespace-separated words (``"whitespace"``), the vocabularies those of the training
files. The final evaluation decodes every evaluation pair greedily: exact match, BLEU and
chrF (sacrebleu). The defaults are the sample in ``configs/samples/pairs/``: English
number words to digits ("three hundred and twelve" -> "3 1 2"), 800 numbers below 1,000
to train on and the other 200 to evaluate.

``arg``: ``quick`` or ``full`` (default), optionally with ``,rnn`` for the LSTM
encoder-decoder with additive attention instead of the Transformer.
"""

import pathlib

import ml_collections

from configs import common

SAMPLES = pathlib.Path(__file__).resolve().parent / "samples" / "pairs"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, about a minute) or ``None`` / ``"full"`` (accelerator),
    then optionally ``",rnn"``."""
    args = common.variant(arg, "configs/pairs.py", rnn=False)
    quick, rnn = args.quick, args.rnn
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "pairs"
    config.data.train_files = str(SAMPLES / "train.tsv")  # paths or globs, comma-separated
    config.data.eval_files = str(SAMPLES / "eval.tsv")
    config.data.tokenize = "char"  # or "whitespace"
    config.data.num_eval = 0  # pairs scored while training; 0: every whole batch
    if rnn:
        common.rnn_seq2seq(config, quick, quick_steps=600)
    else:
        common.transformer_seq2seq(config, quick, quick_steps=600)
    if quick:
        config.train.eval_every = config.train.checkpoint_every = 200
    return config
