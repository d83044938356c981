"""Checks a training config before anything is written; errors name the config key."""

from __future__ import annotations

import ml_collections

from attn_jax import kernels
from attn_jax.train.optim import width_factor
from attn_jax.train.tasks import TASKS, validate_task

__all__ = ["ConfigError", "validate_train_config"]


class ConfigError(ValueError):
    """An invalid config value; the message starts with the key, e.g. ``config.optim.x``."""


def _positive(config: ml_collections.ConfigDict, path: str, *, allow_zero: bool = False) -> None:
    node = config
    for part in path.split("."):
        node = node[part]
    ok = isinstance(node, int | float) and not isinstance(node, bool)
    ok = ok and (node >= 0 if allow_zero else node > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{path}: expected a number {bound}, got {node!r}")


def _sequence_parallel(config: ml_collections.ConfigDict, devices: int, processes: int) -> int:
    """``config.train.sequence_parallel`` checked against the devices and the task."""
    seq = config.train.get("sequence_parallel", 1)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ConfigError(f"config.train.sequence_parallel: expected an integer >= 1, got {seq!r}")
    if seq == 1:
        return 1
    if processes > 1:
        raise ConfigError(
            "config.train.sequence_parallel: sequence parallelism runs in one process "
            "(multi-host jobs are data parallel)"
        )
    if devices % seq:
        raise ConfigError(
            f"config.train.sequence_parallel: {seq} does not divide the {devices} devices"
        )
    if not TASKS[config.data.name].sequence_parallel:
        supported = sorted(name for name, task in TASKS.items() if task.sequence_parallel)
        raise ConfigError(
            f"config.train.sequence_parallel: task {config.data.name!r} has no sequence-"
            f"parallel loss; decoder LM tasks do: {', '.join(supported)}"
        )
    return seq


def validate_train_config(
    config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1
) -> None:
    """Raises :class:`ConfigError` for the first invalid value found.

    ``num_devices``: local devices available; ``num_processes``: processes of a multi-host
    job (the global batch is split over all their devices).
    """
    try:
        if config.data.name not in TASKS:
            raise ConfigError(
                f"config.data.name: unknown task {config.data.name!r}; available: {sorted(TASKS)}"
            )
        attention = config.model.attention
        rnn_without_attention = attention == "none" and config.model.get("name") == "seq2seq_rnn"
        if attention not in kernels.available() and not rnn_without_attention:
            raise ConfigError(
                f"config.model.attention: unknown kernel {attention!r}; available: "
                f"{', '.join(kernels.available())}"
            )
        for path in (
            "optim.learning_rate",
            "train.steps",
            "train.batch_size",
            "train.log_every",
            "train.eval_every",
            "train.checkpoint_every",
            "train.keep_checkpoints",
        ):
            _positive(config, path)
        for path in (
            "optim.warmup_steps",
            "optim.weight_decay",
            "optim.grad_clip",
            "train.num_devices",
        ):
            _positive(config, path, allow_zero=True)
        workers = config.data.get("workers", 0)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(
                f"config.data.workers: expected an integer >= 0 (worker processes building "
                f"batches), got {workers!r}"
            )
        if config.optim.get("lr_reference_width", 0):
            _positive(config, "optim.lr_reference_width")
            try:
                width_factor(config.optim, config.model.get("width"))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if config.train.num_devices > num_devices:
            raise ConfigError(
                f"config.train.num_devices: {config.train.num_devices} requested but only "
                f"{num_devices} local devices"
            )
        local = config.train.num_devices or num_devices
        seq = _sequence_parallel(config, local, num_processes)
        devices = local // seq * num_processes  # the batch is split over these
        if config.train.batch_size % devices:
            across = f" of {num_processes} processes" if num_processes > 1 else ""
            what = f"{devices} data-parallel groups" if seq > 1 else f"{devices} devices"
            raise ConfigError(
                f"config.train.batch_size: {config.train.batch_size} is not divisible by the "
                f"{what}{across}"
            )
        if config.data.num_eval % config.train.batch_size:
            raise ConfigError(
                f"config.data.num_eval: {config.data.num_eval} must be a multiple of "
                f"config.train.batch_size ({config.train.batch_size})"
            )
        validate_task(config)  # data and model fields; errors name the config key
    except (KeyError, AttributeError) as error:
        raise ConfigError(f"config: missing key {error}") from None
    except ConfigError:
        raise
    except ValueError as error:  # from the data/model checks, which name config keys
        raise ConfigError(str(error)) from None
