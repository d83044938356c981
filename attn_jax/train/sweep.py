"""Hyperparameter sweeps: trials declared by a config's ``get_sweep(arg)``.

A trial is a dict of config overrides, ``{"optim.learning_rate": 3e-3, ...}``. Build lists
of trials with :func:`product`, :func:`zipped` and :func:`random_choices`. :func:`run_sweep`
runs each trial in ``<workdir>/trial_NNN`` (resumable like any run), skips trials whose
``result.json`` exists, and writes ``sweep.csv``, ``leaderboard.md`` and ``sweep.png``.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from attn_jax.train.loop import TrainingDivergedError

__all__ = ["apply_overrides", "product", "random_choices", "run_sweep", "zipped"]

Trial = dict[str, Any]


def product(**axes: Sequence[Any]) -> list[Trial]:
    """Every combination: ``product(**{"optim.learning_rate": [1e-3, 3e-3], "seed": [0, 1]})``
    gives 4 trials (keys are dotted config paths; pass them with ``**{...}``)."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def zipped(**axes: Sequence[Any]) -> list[Trial]:
    """Values taken in lockstep; every axis must have the same length."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped: axes differ in length: {lengths}")
    return [dict(zip(axes, values, strict=True)) for values in zip(*axes.values(), strict=True)]


def random_choices(num_trials: int, seed: int = 0, **axes: Sequence[Any]) -> list[Trial]:
    """``num_trials`` trials, each picking one value per axis uniformly (reproducible)."""
    rng = np.random.default_rng(seed)
    return [
        {k: values[int(rng.integers(len(values)))] for k, values in axes.items()}
        for _ in range(num_trials)
    ]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Trial
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted-path overrides; an unknown key raises ``ValueError``."""
    config = copy.deepcopy(config)
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            if part not in node:
                raise ValueError(f"sweep: config.{path}: no such key in the config")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"sweep: config.{path}: no such key in the config")
        node[leaf] = value
    return config


def _write_outputs(
    rows: list[dict[str, Any]], keys: list[str], workdir: pathlib.Path, metric: str
) -> None:
    columns = ["trial", *keys, *sorted({k for r in rows for k in r} - {"trial", *keys})]
    with (workdir / "sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    ranked = sorted(rows, key=lambda r: -np.nan_to_num(r.get(metric, -math.inf), nan=-math.inf))
    lines = [f"| rank | trial | {' | '.join(keys)} | {metric} |", "| --- " * (len(keys) + 3) + "|"]
    for rank, row in enumerate(ranked, 1):
        values = " | ".join(str(row[k]) for k in keys)
        lines.append(
            f"| {rank} | {row['trial']} | {values} | {row.get(metric, float('nan')):.4f} |"
        )
    (workdir / "leaderboard.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        xs = [row[key] for row in rows]
        ys = [row.get(metric, float("nan")) for row in rows]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.plot(xs, ys, "o")
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.plot([labels.index(str(x)) for x in xs], ys, "o")
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(workdir / "sweep.png", dpi=100)
    plt.close(fig)


def run_sweep(
    config: ml_collections.ConfigDict,
    trials: list[Trial],
    workdir: str | pathlib.Path,
    train_fn: Callable[[ml_collections.ConfigDict, pathlib.Path], dict[str, Any]],
    *,
    metric: str = "accuracy",
) -> list[dict[str, Any]]:
    """Runs every trial (skipping finished ones) and writes the sweep summaries.

    Every trial's config is built first, so an unknown key fails before anything runs.

    A trial whose loss diverges is recorded (``status`` "diverged", metric NaN) and the
    sweep goes on; an interrupted one (SIGTERM) stops the sweep and resumes on rerun.

    Returns:
      One row per trial: ``trial``, the overrides, ``status`` and the final eval metrics.
    """
    if not trials:
        raise ValueError("sweep: get_sweep() returned no trials")
    workdir = pathlib.Path(workdir)
    configs = [apply_overrides(config, trial) for trial in trials]
    keys = list(dict.fromkeys(k for trial in trials for k in trial))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (trial, trial_config) in enumerate(zip(trials, configs, strict=True)):
        name = f"trial_{index:03d}"
        trial_dir = workdir / name
        done = trial_dir / "result.json"
        if done.exists():
            print(f"sweep: {name} already finished, skipping", flush=True)
            result = json.loads(done.read_text())
        else:
            print(f"sweep: {name} {trial}", flush=True)
            try:
                result = train_fn(trial_config, trial_dir)
                status = "interrupted" if result.get("interrupted") else "finished"
            except TrainingDivergedError as error:
                print(f"sweep: {name} diverged: {error}", flush=True)
                result, status = {"eval": {metric: float("nan")}}, "diverged"
            if status == "interrupted":  # resumable: no result.json, stop the sweep here
                raise KeyboardInterrupt(f"sweep interrupted during {name}")
            result = {"overrides": trial, "status": status, "eval": result["eval"]}
            trial_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(result))
        rows.append({"trial": name, **trial, "status": result["status"], **result["eval"]})
    _write_outputs(rows, keys, workdir, metric)
    return rows
