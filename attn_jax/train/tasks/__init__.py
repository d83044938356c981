"""Tasks: a dataset, a model, a loss and a final evaluation, built from a config.

``config.data.name`` picks the task; ``config.model.name`` the model where a task offers
several. Registered tasks: ``mqar``, ``copy``, ``induction`` (decoder LMs), ``scan``,
``numbers`` (seq2seq), ``listops``, ``digits`` (classification), ``digit_captions``
(image -> text), and on the user's own files ``text`` (byte- or character-level LM),
``pairs`` (seq2seq on TSV) and ``labelled`` (classification on JSONL / CSV).

Tasks register by name in :mod:`attn_jax.train.tasks.registry`, from any package: a
``@register_task("name")`` decorator on ``build(config) -> Task``, or a module's
``TASKS = {name: TaskDefinition(...)}`` dict (as every built-in module does).
``$ATTN_JAX_TASK_MODULES`` (comma-separated modules) is imported here, after the built-in
tasks.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from attn_jax.train.tasks import (
    captions,
    classification,
    labelled,
    language_model,
    pairs,
    seq2seq,
    text,
)
from attn_jax.train.tasks.base import Task, TaskDefinition, transformer_options
from attn_jax.train.tasks.registry import (
    TASKS,
    import_task_modules,
    register_task,
    register_tasks,
    unregister_task,
)

__all__ = [
    "TASKS",
    "Task",
    "TaskDefinition",
    "build_task",
    "import_task_modules",
    "init_params",
    "register_task",
    "register_tasks",
    "transformer_options",
    "unregister_task",
    "validate_task",
]

# Every built-in module registers its TASKS dict here (the decorator is for other packages).
for _module in (language_model, seq2seq, classification, captions, text, pairs, labelled):
    register_tasks(getattr(_module, "TASKS", {}), _module.__name__)


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


import_task_modules()  # $ATTN_JAX_TASK_MODULES, last: their modules may import this package
