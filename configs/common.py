"""Defaults shared by every training config (``from configs import common``)."""

from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Seed, optimiser and loop defaults; a task config fills ``data`` and ``model``."""
    config = ml_collections.ConfigDict()
    config.task = "train"
    config.seed = 0

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.1
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.grad_clip = 1.0
    config.optim.end_learning_rate_factor = 0.0
    # > 0: learning_rate is tuned at this model width; the hidden matrices' rate scales as
    # 1 / config.model.width (muP's rule for Adam; attn_jax.train.optim.width_factor).
    config.optim.lr_reference_width = 0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 1000
    config.train.batch_size = 64  # global, split over the devices
    config.train.num_devices = 0  # 0 = every local device
    # > 1: split each sequence over this many devices, with ring attention in every layer
    # (decoder LM tasks, one process); the rest of the devices split the batch.
    config.train.sequence_parallel = 1
    config.train.sequence_ordering = "striped"  # or "contiguous" (see attn_jax.kernels.ring)
    config.train.log_every = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.keep_checkpoints = 3
    return config


def data_config() -> ml_collections.ConfigDict:
    """A new ``config.data`` holding the fields the training pipeline reads for every
    task: ``workers``, worker processes building batches (grain; 0: threads of the
    trainer). Task configs add their own fields."""
    data = ml_collections.ConfigDict()
    data.workers = 0
    return data


def scan_data() -> ml_collections.ConfigDict:
    """``config.data`` of SCAN: the split, the monitored test subset, length buckets."""
    data = data_config()
    data.name = "scan"
    data.split = "simple"  # simple | length | addprim_jump
    data.num_eval = 512  # test pairs evaluated (teacher-forced) while training
    data.num_test = 0  # test pairs decoded by the final evaluation; 0 = all, as published
    data.bucket_by = "target"  # final exact match by action-sequence length
    data.length_buckets = [8, 16, 22, 32, 40]
    return data


def numbers_data() -> ml_collections.ConfigDict:
    """``config.data`` of English -> German number translation (``attn_jax.data.numbers``)."""
    data = data_config()
    data.name = "numbers"
    data.max_digits = 9  # numbers below 10**9: 1 to 22 English tokens
    data.num_train = 20_000
    data.num_valid = 1_024
    data.num_test = 2_000
    data.num_eval = 512  # validation pairs evaluated (teacher-forced) while training
    data.bucket_by = "source"  # final BLEU / exact match by English length
    data.length_buckets = [4, 8, 12, 16]
    return data


def model_config() -> ml_collections.ConfigDict:
    """An empty ``config.model`` with the field every model has: ``api``, ``"linen"``
    (flax.linen, attn_jax.models) or ``"nnx"`` (the Flax NNX twins, attn_jax.nnx: the
    same parameters and numbers)."""
    model = ml_collections.ConfigDict()
    model.api = "linen"
    return model


def lm_model() -> ml_collections.ConfigDict:
    """``config.model`` of a small decoder LM (copy, induction heads): RoPE, 2 layers."""
    model = model_config()
    model.attention = "auto"
    model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    model.width = 64
    model.num_layers = 2
    model.num_heads = 4
    model.mlp_dim = 256
    model.positions = "rope"
    model.scan_layers = False  # True: one nn.scan over the layers
    model.remat = "none"  # or "full", "dots", "dots_with_no_batch_dims"
    return model


def digits_data() -> ml_collections.ConfigDict:
    """``config.data`` of scikit-learn's 8x8 digits (``attn_jax.data.digits``)."""
    data = data_config()
    data.name = "digits"
    data.test_fraction = 0.2  # 1,437 train / 360 test images, stratified
    data.num_eval = 320  # test images evaluated while training (a multiple of the batch)
    return data


def lm_packing(data: ml_collections.ConfigDict) -> None:
    """Sequence packing of a decoder-LM task's training examples: ``data.pack=True`` puts
    several examples into each row of ``data.pack_length`` tokens (0: the task's training
    length), with positions restarting and no attention across examples."""
    data.pack = False
    data.pack_length = 0


def parse_arg(arg: str | None, path: str, **spec: Any) -> ml_collections.ConfigDict:
    """Named config arguments, as big_vision's ``parse_arg``: ``--config=FILE:ARG`` with
    ``ARG`` like ``quick,seq_len=128``.

    Args:
      arg: the string after ``:`` (``None``: every argument at its default):
        comma-separated ``name=value`` items; a bare ``name`` means ``name=True``.
      path: the config file, for error messages.
      **spec: each argument's default, whose type (bool, int, float or str) parses the
        value; or ``(default, type)`` (e.g. ``(None, int)``).

    Returns:
      The arguments by name (``args.quick``, ``args.seq_len``).

    Raises:
      ValueError: one line naming ``path`` and the argument, for an unknown argument, one
        given twice, or a value its type cannot parse.
    """
    types = {}
    result = ml_collections.ConfigDict()
    for name, default in spec.items():
        default, kind = default if isinstance(default, tuple) else (default, type(default))
        types[name] = kind
        result[name] = default
    given: set[str] = set()
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        name, equals, text = (part.strip() for part in item.partition("="))
        if name not in types:
            raise ValueError(
                f"{path}: unknown config argument {name!r} in {arg!r}; expected one of "
                f"{', '.join(types)}"
            )
        if name in given:
            raise ValueError(f"{path}: config argument {name!r} given twice in {arg!r}")
        given.add(name)
        result[name] = _parse_value(path, name, text if equals else "True", types[name])
    return result


def _parse_value(path: str, name: str, text: str, kind: type) -> Any:
    """``text`` as a ``kind``; a bad value raises naming ``path`` and ``name``."""
    if kind is bool:
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() in words:
            return words[text.lower()]
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    expected = {bool: "True or False", int: "an integer", float: "a number"}
    raise ValueError(
        f"{path}: config argument {name!r} expects {expected.get(kind, kind.__name__)}, "
        f"got {text!r}"
    )


def is_quick(arg: str | None, path: str) -> bool:
    """The variant of a task config without further arguments: ``"quick"`` (CPU,
    minutes) -> True; ``None`` or ``"full"`` (sized for an accelerator) -> False; anything
    else raises naming ``path`` (see :func:`variant`)."""
    return variant(arg, path).quick


def variant(arg: str | None, path: str, **spec: Any) -> ml_collections.ConfigDict:
    """:func:`parse_arg` with the two sizes every task config has, ``quick`` (CPU,
    minutes) and ``full`` (an accelerator, the default), plus ``spec``."""
    args = parse_arg(arg, path, quick=False, full=False, **spec)
    if args.quick and args.full:
        raise ValueError(f"{path}: config arguments 'quick' and 'full' exclude each other")
    return args


def _schedule(config: ml_collections.ConfigDict, steps: int, batch: int, every: int) -> None:
    config.train.steps = steps
    config.train.batch_size = batch
    config.train.eval_every = every
    config.train.checkpoint_every = every


def rnn_seq2seq(config: ml_collections.ConfigDict, quick: bool, quick_steps: int) -> None:
    """``config.model`` (bidirectional LSTM encoder, LSTM decoder with additive attention)
    and training: 10,000 steps of batch 128 at width 256, or ``quick_steps`` of batch 64 at
    width 128 on CPU."""
    config.model = model_config()
    config.model.name = "seq2seq_rnn"
    config.model.attention = "additive"  # additive | multiplicative | none
    config.model.score = "general"  # multiplicative: general | dot
    config.model.encoder_cell = "lstm"
    config.model.bidirectional = True
    config.model.embed_dim = 64 if quick else 128
    config.model.hidden_dim = 128 if quick else 256
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    _schedule(config, *((quick_steps, 64, 500) if quick else (10_000, 128, 1_000)))


def transformer_seq2seq(config: ml_collections.ConfigDict, quick: bool, quick_steps: int) -> None:
    """``config.model`` (encoder-decoder Transformer, sinusoidal positions) and training:
    3 + 3 layers of width 128 with dropout for 10,000 steps of batch 128, or 2 + 2 layers
    of width 64 without dropout for ``quick_steps`` of batch 64 on CPU."""
    config.model = model_config()
    config.model.name = "encoder_decoder"
    config.model.attention = "auto"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 64 if quick else 128
    config.model.num_layers = 2 if quick else 3
    config.model.num_heads = 4
    config.model.mlp_dim = 4 * config.model.width
    config.model.positions = "sinusoidal"
    config.model.scan_layers = False  # True: one nn.scan over the layers
    config.model.remat = "none"  # or "full", "dots", "dots_with_no_batch_dims"
    config.model.dropout_rate = 0.0 if quick else 0.1
    config.optim.learning_rate = 1e-3 if quick else 5e-4
    config.optim.weight_decay = 0.0
    _schedule(config, *((quick_steps, 64, 500) if quick else (10_000, 128, 1_000)))


def digits_transformer(config: ml_collections.ConfigDict, quick: bool, quick_steps: int) -> None:
    """Transformer sizes and training shared by the digits configs (``config.model.name``
    and its inputs are set by the caller): ViT-Tiny-like 6 layers of width 192 for 5,000
    steps, or 2 layers of width 64 for ``quick_steps`` on CPU; batch 64."""
    config.model = model_config()
    config.model.pooling = "cls"
    config.model.attention = "auto"
    config.model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    config.model.width = 64 if quick else 192
    config.model.num_layers = 2 if quick else 6
    config.model.num_heads = 4 if quick else 3
    config.model.mlp_dim = 2 * config.model.width if quick else 4 * config.model.width
    config.model.positions = "learned"
    config.model.scan_layers = False  # True: one nn.scan over the layers
    config.model.remat = "none"  # or "full", "dots", "dots_with_no_batch_dims"
    config.model.dropout_rate = 0.1
    config.optim.weight_decay = 0.05
    _schedule(config, *((quick_steps, 64, 250) if quick else (5_000, 64, 500)))
