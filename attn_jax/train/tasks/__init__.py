"""Tasks: a dataset, a model, a loss and a final evaluation, built from a config.

``config.data.name`` picks the task; ``config.model.name`` the model where a task offers
several. Registered tasks: ``mqar``, ``copy``, ``induction`` (decoder LMs), ``scan``,
``numbers`` (seq2seq), ``listops``, ``digits`` (classification).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from attn_jax.train.tasks import classification, language_model, seq2seq
from attn_jax.train.tasks.base import Task, TaskDefinition, transformer_options

__all__ = ["TASKS", "Task", "TaskDefinition", "build_task", "init_params", "transformer_options"]

TASKS: dict[str, TaskDefinition] = {
    **language_model.TASKS,
    **seq2seq.TASKS,
    **classification.TASKS,
}


def _definition(config: ml_collections.ConfigDict) -> TaskDefinition:
    name = config.data.name
    if name not in TASKS:
        raise ValueError(f"config.data.name: unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The task named ``config.data.name``."""
    return _definition(config).build(config)


def validate_task(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the config key if the task or model config is invalid."""
    _definition(config).validate(config)


def init_params(task: Task, rng: jax.Array) -> Any:
    """Initial parameters of ``task.model`` (jitted init)."""
    inputs = task.model_inputs(task.init_batch())
    return jax.jit(lambda r: task.model.init(r, *inputs))(rng)["params"]
