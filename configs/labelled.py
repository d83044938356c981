"""Text classification on your own labelled JSONL or CSV files.

    python launch.py --config=configs/labelled.py:quick                  # the sample, CPU
    python launch.py --config=configs/labelled.py --config.data.train_files=train.jsonl \\
        --config.data.eval_files=test.csv --config.data.labels=neg,pos

JSONL: one ``{"text": ..., "label": ...}`` object per line; CSV: a header with ``text`` and
``label`` columns. The classes are ``config.data.labels`` or, if empty, the training
files' labels; the model is the Transformer encoder classifier of ListOps, and the final
evaluation reports accuracy overall and per class. The defaults are the sample in
``configs/samples/labelled/``: short sentences about weather, sport, food or music (400 to
train on in JSONL, 160 to evaluate in CSV, whose topic phrases are half new).
"""

import pathlib

import ml_collections

from configs import common

SAMPLES = pathlib.Path(__file__).resolve().parent / "samples" / "labelled"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``"quick"`` (CPU, under a minute), or ``None`` / ``"full"`` (accelerator)."""
    config = common.base_config()
    config.data = common.data_config()
    config.data.name = "labelled"
    config.data.train_files = str(SAMPLES / "train.jsonl")  # paths or globs, comma-separated
    config.data.eval_files = str(SAMPLES / "eval.csv")
    config.data.tokenize = "whitespace"  # or "char"
    config.data.labels = ""  # e.g. "neg,pos"; empty: the training files' labels, sorted
    config.data.max_len = 512  # tokens kept per text (0: the longest text)
    config.data.num_eval = 0  # examples scored while training; 0: every whole batch

    config.model = common.model_config()
    config.model.name = "encoder"
    config.model.pooling = "cls"
    config.model.attention = "auto"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 256
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 1024
    config.model.positions = "learned"
    config.model.scan_layers = False  # True: one nn.scan over the layers
    config.model.remat = "none"  # or "full", "dots", "dots_with_no_batch_dims"
    config.model.dropout_rate = 0.1

    config.optim.learning_rate = 5e-4
    config.train.steps = 5_000
    config.train.batch_size = 32
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    if common.is_quick(arg, "configs/labelled.py"):
        config.data.max_len = 0
        config.model.width = 64
        config.model.num_layers = 2
        config.model.mlp_dim = 128
        config.optim.learning_rate = 1e-3
        config.train.steps = 300
        config.train.eval_every = 100
        config.train.checkpoint_every = 100
    return config
