"""The optuna sweep backend: trial counts, shared studies, resume, launcher flags."""

from __future__ import annotations

import csv
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import optuna
import pytest

from attn_jax.train.loop import TrainingDivergedError
from attn_jax.train.optuna_search import (
    categorical,
    default_storage,
    integers,
    log_uniform,
    run_study,
    uniform,
)
from attn_jax.train.sweep import SweepInterruptedError
from configs import mqar
from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPACE = {"optim.learning_rate": log_uniform(1e-4, 1e-1), "model.positions": categorical(["a"])}


def _config():
    config = mqar.get_config("quick")
    config.data.vocab_size = 256
    return config


def _scored(calls):
    def train(config, workdir, **kwargs):
        calls.append((workdir.name, config.optim.learning_rate))
        return {"eval": {"accuracy": -abs(math.log10(config.optim.learning_rate) + 2)}}

    return train


def test_search_space_helpers_check_their_bounds():
    assert integers(1, 3).kind == "integers" and uniform(0.0, 1.0).high == 1.0
    with pytest.raises(ValueError, match="low < high"):
        uniform(1.0, 1.0)
    with pytest.raises(ValueError, match="low must be > 0"):
        log_uniform(0.0, 1.0)
    with pytest.raises(ValueError, match="at least one choice"):
        categorical([])
    with pytest.raises(ValueError, match=r"config\.optim\.nope"):
        run_study(_config(), {"optim.nope": uniform(0, 1)}, "/nonexistent", None, num_trials=1)


def test_study_runs_to_its_count_and_a_rerun_adds_only_what_is_missing(tmp_path, capsys):
    calls = []
    rows = run_study(_config(), SPACE, tmp_path, _scored(calls), num_trials=3, seed=0)
    assert [r["trial"] for r in rows] == ["trial_000", "trial_001", "trial_002"]
    assert [c[0] for c in calls] == ["trial_000", "trial_001", "trial_002"]
    assert all(1e-4 <= lr <= 1e-1 for _, lr in calls)
    assert (tmp_path / "optuna.db").exists()
    with (tmp_path / "sweep.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert (tmp_path / "leaderboard.md").read_text().count("| trial_") == 3

    run_study(_config(), SPACE, tmp_path, _scored(calls), num_trials=3, seed=0)
    assert len(calls) == 3 and "already holds 3 finished trials" in capsys.readouterr().out
    rows = run_study(_config(), SPACE, tmp_path, _scored(calls), num_trials=4, seed=0)
    assert len(calls) == 4 and len(rows) == 4 and calls[-1][0] == "trial_003"


def test_two_workers_share_one_study_through_the_storage(tmp_path):
    """Two independent runners (own storage connections) on one SQLite study: together
    they finish the wanted count (a runner may finish the trial it had started), and no
    trial directory is used twice."""
    calls, lock = [], threading.Lock()

    def slow(config, workdir, **kwargs):
        time.sleep(0.2)
        with lock:
            calls.append(workdir.name)
        return {"eval": {"accuracy": config.optim.learning_rate}}

    storage = default_storage(tmp_path)
    errors = []

    def worker(seed):
        try:
            run_study(
                _config(),
                SPACE,
                tmp_path,
                slow,
                num_trials=6,
                storage=storage,
                study_name="shared",
                seed=seed,
            )
        except Exception as error:  # reported below: a thread's exception is not a failure
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert 6 <= len(calls) <= 7 and len(set(calls)) == len(calls)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == len(calls)


def test_interrupted_trial_is_rerun_with_its_parameters_and_directory(tmp_path):
    calls = []

    def interrupted_first(config, workdir, **kwargs):
        calls.append((workdir.name, config.optim.learning_rate))
        return {"eval": {"accuracy": 0.5}, "interrupted": len(calls) == 1}

    with pytest.raises(SweepInterruptedError, match="rerun"):
        run_study(_config(), SPACE, tmp_path, interrupted_first, num_trials=2, seed=0)
    rows = run_study(_config(), SPACE, tmp_path, interrupted_first, num_trials=2, seed=0)
    assert calls[1] == calls[0]  # same directory (its checkpoints) and same learning rate
    assert [r["trial"] for r in rows] == ["trial_000", "trial_002"]


def test_diverged_trials_are_recorded_and_counted(tmp_path):
    def diverge_high(config, workdir, **kwargs):
        if config.optim.learning_rate > 3e-3:
            raise TrainingDivergedError("loss is nan")
        return {"eval": {"accuracy": 0.5}}

    rows = run_study(_config(), SPACE, tmp_path, diverge_high, num_trials=6, seed=0)
    assert len(rows) == 6
    diverged = [r for r in rows if r["status"] == "diverged"]
    assert diverged and all(math.isnan(r["accuracy"]) for r in diverged)
    assert all(r["optim.learning_rate"] > 3e-3 for r in diverged)


def test_launcher_optuna_sweep_side_by_side(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "launch.py"),
        f"--config={ROOT}/configs/mqar.py:quick",
        "--config.data.vocab_size=256",
        "--config.train.steps=4",
        "--config.train.batch_size=8",
        "--sweep",
        "--sweep_backend=optuna",
        "--optuna_trials=2",
        "--optuna_seed=0",
        "--sweep_parallel=2",
        f"--workdir={tmp_path}",
    ]
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices=2)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "sweep done: 2 trials" in result.stdout
    assert "[trial_000] step" in result.stdout and "[trial_001] step" in result.stdout
    assert (tmp_path / "optuna.db").exists() and (tmp_path / "sweep.png").exists()
