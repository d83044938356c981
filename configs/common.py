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
