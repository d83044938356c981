"""The task registry: decorated tasks from any module, TASKS dicts, duplicates, README's task."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

from attn_jax.train import tasks
from attn_jax.train.loop import train_and_evaluate
from attn_jax.train.sweep import apply_overrides
from attn_jax.train.tasks import TASKS, TaskDefinition, register_task, unregister_task
from attn_jax.train.validate import ConfigError, validate_train_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = {  # as tests/train/test_tasks.py
    "train.steps": 2,
    "train.batch_size": 8,
    "train.num_devices": 1,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "optim.warmup_steps": 1,
    "data.num_eval": 8,
}


def readme_task() -> str:
    """The third-party task of README's "Your own task" section."""
    section = (ROOT / "README.md").read_text().split("### Your own task", 1)[1]
    return re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)[0]


def test_readme_task_registers_from_its_own_file_and_trains(tmp_path):
    code = readme_task()
    assert len(code.splitlines()) < 40
    (tmp_path / "my_task.py").write_text(code)
    spec = importlib.util.spec_from_file_location("my_task", tmp_path / "my_task.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        spec.loader.exec_module(module)  # loaded twice (as sweeps do): the same function
        assert TASKS["majority"].build is module.build
        config = apply_overrides(module.get_config(), SMOKE)
        validate_train_config(config, jax.local_device_count())
        result = train_and_evaluate(config, tmp_path / "run")
        assert result["step"] == 2 and np.isfinite(result["eval"]["loss"])
        assert 0.0 <= result["eval"]["accuracy"] <= 1.0
    finally:
        unregister_task("majority")
    assert "majority" not in TASKS


def test_builtin_tasks_register_through_their_modules_tasks_dicts():
    assert {"validate_task", "build_task", "register_task"} <= set(tasks.__all__)
    for module in (tasks.text, tasks.pairs, tasks.labelled, tasks.captions, tasks.seq2seq):
        for name, definition in module.TASKS.items():
            assert TASKS[name] is definition


def test_duplicate_names_are_errors_naming_them():
    @register_task("registry_test")
    def build(config):
        raise NotImplementedError

    try:
        assert TASKS["registry_test"].validate is build  # validate defaults to build
        register_task("registry_test")(build)  # the same function again: no error

        def other(config):
            raise NotImplementedError

        with pytest.raises(ValueError, match="task 'registry_test' is already registered"):
            register_task("registry_test")(other)
        with pytest.raises(ValueError, match=r"task 'text' is already registered \(by .*text"):
            register_task("text")(other)
        with pytest.raises(ValueError, match="task 'mqar' is already registered"):
            tasks.register_tasks({"mqar": TaskDefinition(other, other)}, "someone.else")
    finally:
        unregister_task("registry_test")
    with pytest.raises(ConfigError, match=r"config\.data\.name: unknown task 'registry_test'"):
        config = importlib.import_module("configs.mqar").get_config("quick")
        validate_train_config(apply_overrides(config, {"data.name": "registry_test"}), 1)


def test_modules_named_in_the_environment_variable_register_their_tasks(tmp_path, monkeypatch):
    (tmp_path / "dict_tasks_module.py").write_text(
        "from attn_jax.train.tasks import TaskDefinition\n"
        "def build(config):\n    return 'built'\n"
        "TASKS = {'dict_task': TaskDefinition(build, build)}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert tasks.import_task_modules(" dict_tasks_module, ") == ["dict_tasks_module"]
        config = apply_overrides(importlib.import_module("configs.mqar").get_config("quick"), {})
        config.data.name = "dict_task"
        assert tasks.build_task(config) == "built"
        monkeypatch.setenv(tasks.registry.MODULES_ENV, "dict_tasks_module")
        tasks.import_task_modules()  # again: the same dict, no duplicate error
    finally:
        unregister_task("dict_task")
        sys.modules.pop("dict_tasks_module", None)
    with pytest.raises(ImportError, match="ATTN_JAX_TASK_MODULES: cannot import task module 'no_"):
        tasks.import_task_modules("no_such_task_module")
