"""The task registry: ``config.data.name`` -> :class:`~attn_jax.train.tasks.base.TaskDefinition`.

A task registers from any package with a decorator on its build function, so
``launch.py`` runs it by name with no edit to attn_jax::

    from attn_jax.train.tasks import Task, register_task

    @register_task("my_task")           # validate= (default: build the task) checks a config
    def build(config) -> Task: ...

The module must be imported before the config is validated: import it from the config
file (configs are Python), or name it in ``ATTN_JAX_TASK_MODULES=pkg.mod1,pkg.mod2``,
which ``attn_jax.train.tasks`` imports when it is first imported. Modules may instead
expose a ``TASKS = {name: TaskDefinition(...)}`` dict (:func:`register_tasks`; the
built-in task modules do). Registering a name twice is an error naming it, unless it is
the same function again (a module or config file loaded twice, as sweeps do).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from attn_jax.train.tasks.base import Task, TaskDefinition

__all__ = [
    "MODULES_ENV",
    "TASKS",
    "import_task_modules",
    "register_task",
    "register_tasks",
    "unregister_task",
]

MODULES_ENV = "ATTN_JAX_TASK_MODULES"
BuildFn = Callable[[ml_collections.ConfigDict], Task]

TASKS: dict[str, TaskDefinition] = {}  # read it, never write it: register instead
_SOURCES: dict[str, str] = {}  # name -> where it was registered, for duplicate errors


def _origin(fn: Callable[..., Any]) -> str:
    """``file:qualname`` of a function (the same after a module or file is reloaded)."""
    try:
        where = inspect.getsourcefile(fn) or fn.__module__
    except TypeError:
        where = getattr(fn, "__module__", "?")
    return f"{where}:{getattr(fn, '__qualname__', repr(fn))}"


def _add(name: str, definition: TaskDefinition, source: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task: expected a non-empty task name, got {name!r}")
    if not isinstance(definition, TaskDefinition):
        raise TypeError(f"register_task: task {name!r}: expected a TaskDefinition")
    if name in TASKS and _SOURCES[name] != source:
        raise ValueError(
            f"register_task: task {name!r} is already registered (by {_SOURCES[name]}); "
            f"{source} cannot register it too: choose another name"
        )
    TASKS[name], _SOURCES[name] = definition, source


def register_task(
    name: str,
    *,
    validate: Callable[[ml_collections.ConfigDict], Any] | None = None,
    sequence_parallel: bool = False,
) -> Callable[[BuildFn], BuildFn]:
    """Decorator registering ``build(config) -> Task`` as task ``name``.

    Args:
      name: the ``config.data.name`` that selects the task.
      validate: ``validate(config)`` raising ``ValueError`` naming the config key, called
        before anything is written; default: ``build`` itself (so keep it cheap, or pass
        a cheaper check).
      sequence_parallel: the task's ``Task.sequence_parallel`` supports
        ``config.train.sequence_parallel > 1``.

    Returns:
      The decorator; it returns ``build`` unchanged.
    """

    def decorator(build: BuildFn) -> BuildFn:
        definition = TaskDefinition(build, validate or build, sequence_parallel)
        _add(name, definition, _origin(build))
        return build

    return decorator


def register_tasks(tasks: Mapping[str, TaskDefinition], source: str) -> None:
    """Registers every entry of a module's ``TASKS`` dict (``source``: the module name)."""
    for name, definition in tasks.items():
        _add(name, definition, f"{source}.TASKS")


def unregister_task(name: str) -> None:
    """Removes task ``name`` (tests); an unknown name raises ``KeyError``."""
    del TASKS[name]
    del _SOURCES[name]


def import_task_modules(names: str | None = None) -> list[str]:
    """Imports the comma-separated modules ``names`` (default: ``$ATTN_JAX_TASK_MODULES``),
    registering the ``TASKS`` dict of any that has one; returns the module names.

    Raises:
      ImportError: a module cannot be imported (the message names the variable).
    """
    names = os.environ.get(MODULES_ENV, "") if names is None else names
    imported = []
    for module_name in filter(None, (n.strip() for n in names.split(","))):
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ImportError(
                f"{MODULES_ENV}: cannot import task module {module_name!r}: {error}"
            ) from error
        tasks = getattr(module, "TASKS", None)
        if isinstance(tasks, Mapping) and tasks is not TASKS:
            register_tasks(tasks, module.__name__)
        imported.append(module_name)
    return imported
