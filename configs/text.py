"""A byte- or character-level language model on your own UTF-8 text files.

    python launch.py --config=configs/text.py:quick                      # the sample, CPU
    python launch.py --config=configs/text.py:quick --config.data.level=char
    python launch.py --config=configs/text.py --config.data.train_files='books/*.txt' \\
        --config.data.eval_files=held_out.txt

Training windows of ``config.data.seq_len`` tokens are drawn anywhere in the training
files, deterministically from ``(config.seed, step)``; the evaluation reports bits per
byte (or per character) on the evaluation files, and the final evaluation scores every
one of their tokens once. The defaults are the sample in ``configs/samples/text/`` (16 KB
of English to train on, 3 KB to evaluate), enough for ``:quick``; the full variant is
sized for megabytes of text on an accelerator (its evaluation files must fill one batch
of windows, 64 x 512 bytes).
"""

import pathlib

import ml_collections

from configs import common

SAMPLES = pathlib.Path(__file__).resolve().parent / "samples" / "text"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, about a minute), or ``None`` / ``"full"`` (accelerator)."""
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "text"
    config.data.train_files = str(SAMPLES / "train.txt")  # paths or globs, comma-separated
    config.data.eval_files = str(SAMPLES / "eval.txt")
    config.data.level = "byte"  # or "char" (vocabulary: the training files' characters)
    config.data.seq_len = 512
    config.data.num_eval = 0  # windows scored while training; 0: every whole batch

    config.model = common.lm_model()
    config.model.width = 512
    config.model.num_layers = 8
    config.model.num_heads = 8
    config.model.mlp_dim = 2048
    config.model.dropout_rate = 0.1

    config.optim.learning_rate = 6e-4
    config.optim.warmup_steps = 1_000
    config.train.steps = 50_000
    config.train.batch_size = 64
    config.train.eval_every = 1_000
    config.train.checkpoint_every = 1_000
    if common.is_quick(arg, "configs/text.py"):
        config.data.seq_len = 64
        config.model = common.lm_model()  # 2 layers of width 64, RoPE
        config.model.dropout_rate = 0.1
        config.optim.learning_rate = 3e-3
        config.train.steps = 1_000
        config.train.batch_size = 32
        config.train.eval_every = 250
        config.train.checkpoint_every = 250
    return config
