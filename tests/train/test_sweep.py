"""Sweeps: trial helpers, end-to-end runs, skipping finished trials."""

from __future__ import annotations

import csv
import json
import math
import threading

import jax
import pytest

from attn_jax.train.loop import TrainingDivergedError, train_and_evaluate
from attn_jax.train.sweep import (
    SweepInterruptedError,
    apply_overrides,
    device_groups,
    product,
    random_choices,
    run_sweep,
    write_outputs,
    zipped,
)
from configs import mqar
from tests.xla_flags import xla_flags


def test_trial_helpers():
    assert product(**{"a": [1, 2], "b.c": ["x", "y"]}) == [
        {"a": 1, "b.c": "x"},
        {"a": 1, "b.c": "y"},
        {"a": 2, "b.c": "x"},
        {"a": 2, "b.c": "y"},
    ]
    assert zipped(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="differ in length"):
        zipped(a=[1], b=[1, 2])
    trials = random_choices(20, seed=3, a=[1, 2, 3], b=["x", "y"])
    assert trials == random_choices(20, seed=3, a=[1, 2, 3], b=["x", "y"])
    assert {t["a"] for t in trials} == {1, 2, 3} and len(trials) == 20


def test_apply_overrides_copies_and_checks_keys():
    config = mqar.get_config("quick")
    changed = apply_overrides(config, {"optim.learning_rate": 0.5, "model.positions": "learned"})
    assert changed.optim.learning_rate == 0.5 and config.optim.learning_rate != 0.5
    with pytest.raises(ValueError, match=r"config\.optim\.nope: no such key"):
        apply_overrides(config, {"optim.nope": 1})


def _quick():
    config = mqar.get_config("quick")
    config.data.vocab_size = 256
    config.train.num_devices = 1
    return config


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory):
    """The quick two-trial sweep, run one trial at a time on one device: (workdir, rows)."""
    workdir = tmp_path_factory.mktemp("sweep")
    return workdir, run_sweep(_quick(), mqar.get_sweep("quick"), workdir, train_and_evaluate)


def test_two_trial_sweep_runs_and_rerun_skips_both(one_by_one, capsys):
    tmp_path, rows = one_by_one
    trials = mqar.get_sweep("quick")
    assert len(trials) == 2
    assert [r["trial"] for r in rows] == ["trial_000", "trial_001"]
    assert all(r["status"] == "finished" and 0 <= r["accuracy"] <= 1 for r in rows)
    with (tmp_path / "sweep.csv").open() as handle:
        saved = list(csv.DictReader(handle))
    assert [float(r["optim.learning_rate"]) for r in saved] == [1e-3, 3e-3]
    assert (tmp_path / "leaderboard.md").read_text().count("| trial_") == 2
    assert (tmp_path / "sweep.png").stat().st_size > 0

    def must_not_run(config, workdir, **kwargs):
        raise AssertionError(f"finished trial {workdir} was run again")

    again = run_sweep(_quick(), trials, tmp_path, must_not_run)
    assert again == rows
    assert capsys.readouterr().out.count("already finished, skipping") == 2


def test_diverged_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    calls = []

    def fake_train(config, workdir, **kwargs):
        calls.append(config.optim.learning_rate)
        if config.optim.learning_rate > 1:
            raise TrainingDivergedError("loss is nan at step 3")
        return {"eval": {"accuracy": 0.5, "loss": 1.0}, "interrupted": False}

    trials = product(**{"optim.learning_rate": [10.0, 0.1]})
    rows = run_sweep(_quick(), trials, tmp_path, fake_train)
    assert calls == [10.0, 0.1]
    assert rows[0]["status"] == "diverged" and math.isnan(rows[0]["accuracy"])
    assert rows[1]["status"] == "finished" and rows[1]["accuracy"] == 0.5
    board = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert "trial_001" in board[2]  # best first; the diverged trial ranks last


def test_unknown_key_fails_before_any_trial_runs(tmp_path):
    with pytest.raises(ValueError, match=r"config\.model\.nope"):
        run_sweep(
            _quick(),
            [{"optim.learning_rate": 0.1}, {"model.nope": 1}],
            tmp_path,
            lambda c, w, **kw: pytest.fail("ran a trial"),
        )
    assert not (tmp_path / "trial_000").exists()


def test_launcher_sweep_flag(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        str(root / "launch.py"),
        f"--config={root}/configs/mqar.py:quick",
        "--config.data.vocab_size=256",
        "--config.train.steps=4",
        "--sweep",
        f"--workdir={tmp_path}",
    ]
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "sweep done: 2 trials" in result.stdout
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "trial_001" / "result.json").exists()


def test_device_groups_split_evenly_or_refuse():
    devices = jax.local_devices()
    groups = device_groups(2)
    assert [len(g) for g in groups] == [4, 4] and groups[0] + groups[1] == devices
    with pytest.raises(ValueError, match="cannot split the 8 local devices"):
        device_groups(3)


def test_side_by_side_trials_match_trials_run_one_by_one(one_by_one, tmp_path, capsys):
    """Two trials on two groups of 4 devices at once give the results of running them one
    after the other (on 1 device: same global batch); each config records its group size."""
    trials = mqar.get_sweep("quick")
    together = run_sweep(_quick(), trials, tmp_path, train_and_evaluate, groups=device_groups(2))
    for alone, both in zip(one_by_one[1], together, strict=True):
        assert alone.keys() == both.keys() and alone["status"] == both["status"]
        for key in ("loss", "accuracy"):
            assert both[key] == pytest.approx(alone[key], rel=2e-5), key
    out = capsys.readouterr().out
    assert "on devices [0, 1, 2, 3]" in out and "on devices [4, 5, 6, 7]" in out
    assert "[trial_001] step" in out  # progress lines name their trial
    saved = json.loads((tmp_path / "trial_001" / "config.json").read_text())
    assert saved["train"]["num_devices"] == 4


def test_groups_run_concurrently_and_one_trial_per_group(tmp_path):
    running, peak, lock = set(), [0], threading.Lock()
    barrier = threading.Barrier(2, timeout=30)

    def fake_train(config, workdir, devices, label):
        with lock:
            assert not any(d in running for d in devices), "a group was handed out twice"
            running.update(devices)
            peak[0] = max(peak[0], len(running))
        barrier.wait()  # fails (BrokenBarrierError) unless two trials run at once
        with lock:
            running.difference_update(devices)
        return {"eval": {"accuracy": config.optim.learning_rate}, "interrupted": False}

    trials = product(**{"optim.learning_rate": [0.1, 0.2, 0.3, 0.4]})
    rows = run_sweep(_quick(), trials, tmp_path, fake_train, groups=device_groups(2))
    assert [r["accuracy"] for r in rows] == [0.1, 0.2, 0.3, 0.4] and peak[0] == 8


def test_interrupted_trial_stops_the_sweep_and_resumes(tmp_path):
    calls = []

    def interrupted_once(config, workdir, **kwargs):
        calls.append(workdir.name)
        interrupted = len(calls) == 1
        return {"eval": {"accuracy": 0.5}, "interrupted": interrupted}

    trials = mqar.get_sweep("quick")
    with pytest.raises(SweepInterruptedError, match="rerun"):
        run_sweep(_quick(), trials, tmp_path, interrupted_once)
    assert not (tmp_path / "trial_000" / "result.json").exists()
    rows = run_sweep(_quick(), trials, tmp_path, interrupted_once)
    assert calls == ["trial_000", "trial_001", "trial_000"]
    assert [r["status"] for r in rows] == ["finished", "finished"]


def test_summaries_accept_trials_that_set_different_keys(tmp_path):
    rows = [
        {"trial": "a", "model.attention": "flash", "accuracy": 0.5},
        {"trial": "b", "model.attention_kwargs": {"local_window_size": (4, 0)}, "accuracy": 0.7},
    ]
    write_outputs(rows, ["model.attention", "model.attention_kwargs"], tmp_path, "accuracy")
    board = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert board[2].startswith("| 1 | b |") and board[3] == "| 2 | a | flash |  | 0.5000 |"
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_summaries_of_trials_without_overrides_skip_the_plot(tmp_path):
    write_outputs([{"trial": "base", "accuracy": 0.5}], [], tmp_path, "accuracy")
    assert (tmp_path / "leaderboard.md").read_text().splitlines()[2] == "| 1 | base |  | 0.5000 |"
    assert not (tmp_path / "sweep.png").exists()
