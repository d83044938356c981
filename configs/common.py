"""Defaults shared by every training config (``from configs import common``)."""

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

    config.train = ml_collections.ConfigDict()
    config.train.steps = 1000
    config.train.batch_size = 64  # global, split over the devices
    config.train.num_devices = 0  # 0 = every local device
    config.train.log_every = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.keep_checkpoints = 3
    return config


def scan_data() -> ml_collections.ConfigDict:
    """``config.data`` of SCAN: the split, the monitored test subset, length buckets."""
    data = ml_collections.ConfigDict()
    data.name = "scan"
    data.split = "simple"  # simple | length | addprim_jump
    data.num_eval = 512  # test pairs evaluated (teacher-forced) while training
    data.num_test = 0  # test pairs decoded by the final evaluation; 0 = all, as published
    data.bucket_by = "target"  # final exact match by action-sequence length
    data.length_buckets = [8, 16, 22, 32, 40]
    return data


def numbers_data() -> ml_collections.ConfigDict:
    """``config.data`` of English -> German number translation (``attn_jax.data.numbers``)."""
    data = ml_collections.ConfigDict()
    data.name = "numbers"
    data.max_digits = 9  # numbers below 10**9: 1 to 22 English tokens
    data.num_train = 20_000
    data.num_valid = 1_024
    data.num_test = 2_000
    data.num_eval = 512  # validation pairs evaluated (teacher-forced) while training
    data.bucket_by = "source"  # final BLEU / exact match by English length
    data.length_buckets = [4, 8, 12, 16]
    return data


def lm_model() -> ml_collections.ConfigDict:
    """``config.model`` of a small decoder LM (copy, induction heads): RoPE, 2 layers."""
    model = ml_collections.ConfigDict()
    model.attention = "dot_product"
    model.attention_kwargs = None  # e.g. {"local_window_size": (16, 0)}
    model.width = 64
    model.num_layers = 2
    model.num_heads = 4
    model.mlp_dim = 256
    model.positions = "rope"
    return model


def digits_data() -> ml_collections.ConfigDict:
    """``config.data`` of scikit-learn's 8x8 digits (``attn_jax.data.digits``)."""
    data = ml_collections.ConfigDict()
    data.name = "digits"
    data.test_fraction = 0.2  # 1,437 train / 360 test images, stratified
    data.num_eval = 320  # test images evaluated while training (a multiple of the batch)
    return data


def is_quick(arg: str | None, path: str) -> bool:
    """The variant of a task config: ``"quick"`` (CPU, minutes) -> True; ``None`` or
    ``"full"`` (sized for an accelerator) -> False; anything else raises naming ``path``."""
    if arg in (None, "full"):
        return False
    if arg == "quick":
        return True
    raise ValueError(f"{path}: unknown variant {arg!r}; expected 'quick' or 'full'")
