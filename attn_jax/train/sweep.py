"""Hyperparameter sweeps: trials declared by a config's ``get_sweep(arg)``.

A trial is a dict of config overrides, ``{"optim.learning_rate": 3e-3, ...}``. Build lists
of trials with :func:`product`, :func:`zipped` and :func:`random_choices`. :func:`run_sweep`
runs each trial in ``<workdir>/trial_NNN`` (resumable like any run), skips trials whose
``result.json`` exists, can run several trials side by side on separate groups of devices
(:func:`device_groups`), and writes ``sweep.csv``, ``leaderboard.md`` and ``sweep.png``.
The optuna backend (:mod:`attn_jax.train.optuna_search`) writes the same summaries.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import csv
import io
import itertools
import json
import math
import os
import pathlib
import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from attn_jax.train.loop import TrainingDivergedError
from attn_jax.train.metrics import PLOT_LOCK
from attn_jax.train.termination import sigterm_stops, stop_requested

__all__ = [
    "SweepInterruptedError",
    "apply_overrides",
    "device_groups",
    "product",
    "random_choices",
    "run_sweep",
    "zipped",
]

Trial = dict[str, Any]
TrainFn = Callable[..., dict[str, Any]]


class SweepInterruptedError(RuntimeError):
    """SIGTERM stopped the sweep; running trials saved checkpoints and resume on rerun."""


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


def device_groups(
    parallel: int, devices: Sequence[jax.Device] | None = None
) -> list[list[jax.Device]]:
    """Splits ``devices`` (default: every local device) into ``parallel`` equal groups."""
    devices = list(devices if devices is not None else jax.local_devices())
    if parallel < 1 or len(devices) % parallel:
        raise ValueError(
            f"sweep parallel: {parallel} groups cannot split the {len(devices)} local devices "
            "evenly; pass a divisor of the device count"
        )
    size = len(devices) // parallel
    return [devices[i * size : (i + 1) * size] for i in range(parallel)]


class DevicePool:
    """Hands device groups to concurrent trials: each trial holds one group while it runs."""

    def __init__(self, groups: Sequence[Sequence[jax.Device]] | None):
        self.groups = [list(g) for g in groups] if groups else [None]
        self._free: queue.Queue = queue.Queue()
        for group in self.groups:
            self._free.put(group)

    def __len__(self) -> int:
        return len(self.groups)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[list[jax.Device] | None]:
        group = self._free.get()
        try:
            yield group
        finally:
            self._free.put(group)

    def map(self, fn: Callable[[Any, list[jax.Device] | None], Any], jobs: Sequence[Any]):
        """``fn(job, group)`` for every job, ``len(self)`` at a time; results in job order.

        Jobs not yet started when SIGTERM arrives are skipped (``None``).
        """

        def run(job):
            if stop_requested():
                return None
            with self.acquire() as group:
                return fn(job, group)

        if len(self) == 1:
            return [run(job) for job in jobs]
        with concurrent.futures.ThreadPoolExecutor(len(self)) as pool:
            return list(pool.map(run, jobs))


def on_group(
    config: ml_collections.ConfigDict, group: list[jax.Device] | None, name: str
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """A trial's config and ``train_fn`` keyword arguments for running on ``group``:
    ``config.train.num_devices`` becomes the group's size and console lines carry the
    trial's name. ``group=None``: unchanged, no extra arguments."""
    if not group:
        return config, {}
    config = copy.deepcopy(config)
    config.train.num_devices = len(group)
    return config, {"devices": group, "label": f"[{name}] "}


def _atomic_write(path: pathlib.Path, text: str) -> None:
    """Writes via a temporary file and a rename, so readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_outputs(
    rows: list[dict[str, Any]], keys: list[str], workdir: pathlib.Path, metric: str
) -> None:
    """``sweep.csv``, ``leaderboard.md`` (best first) and ``sweep.png`` (each swept key
    against ``metric``; none when no key is swept) in ``workdir``."""
    with PLOT_LOCK:  # matplotlib is not thread-safe
        _write_outputs(rows, keys, workdir, metric)


def _write_outputs(
    rows: list[dict[str, Any]], keys: list[str], workdir: pathlib.Path, metric: str
) -> None:
    columns = ["trial", *keys, *sorted({k for r in rows for k in r} - {"trial", *keys})]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(workdir / "sweep.csv", table.getvalue())
    ranked = sorted(rows, key=lambda r: -np.nan_to_num(r.get(metric, -math.inf), nan=-math.inf))
    lines = [f"| rank | trial | {' | '.join(keys)} | {metric} |", "| --- " * (len(keys) + 3) + "|"]
    for rank, row in enumerate(ranked, 1):
        values = " | ".join(str(row.get(k, "")) for k in keys)  # trials may set other keys
        lines.append(
            f"| {rank} | {row['trial']} | {values} | {row.get(metric, float('nan')):.4f} |"
        )
    _atomic_write(workdir / "leaderboard.md", "\n".join(lines) + "\n")

    if not keys:  # a single trial without overrides: nothing to plot against
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        chosen = [row for row in rows if key in row]
        xs = [row[key] for row in chosen]
        ys = [row.get(metric, float("nan")) for row in chosen]
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
    fig.savefig(workdir / f".sweep.{os.getpid()}.png", dpi=100)
    os.replace(workdir / f".sweep.{os.getpid()}.png", workdir / "sweep.png")
    plt.close(fig)


def _final(result: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a trial's final evaluation, as ``final/NAME`` columns."""
    final = result.get("final", {})
    return {f"final/{k}": v for k, v in final.items() if isinstance(v, float)}


def run_sweep(
    config: ml_collections.ConfigDict,
    trials: list[Trial],
    workdir: str | pathlib.Path,
    train_fn: TrainFn,
    *,
    metric: str = "accuracy",
    groups: Sequence[Sequence[jax.Device]] | None = None,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Runs every trial (skipping finished ones) and writes the sweep summaries.

    Every trial's config is built first, so an unknown key fails before anything runs.

    Args:
      config: the base config; each trial's overrides are applied to a copy.
      trials: from ``get_sweep()``.
      workdir: trial ``i`` runs in ``workdir/trial_{i:03d}`` (or ``workdir/names[i]``).
      train_fn: ``train_fn(config, workdir, devices=group, label=name) -> {"eval": {...},
        "interrupted": bool}``, e.g. :func:`attn_jax.train.loop.train_and_evaluate`.
      metric: eval metric to rank by (higher is better).
      groups: device groups (:func:`device_groups`): one trial runs on each group at a
        time, side by side in threads; ``config.train.num_devices`` of each trial is set to
        its group's size. ``None``: one trial at a time on the configured devices.
      names: directory names of the trials (distinct), instead of ``trial_NNN``.

    A trial whose loss diverges is recorded (``status`` "diverged", metric NaN) and the
    sweep goes on. On SIGTERM, running trials save a checkpoint, no new trial starts and
    :class:`SweepInterruptedError` is raised; a rerun resumes them.

    Returns:
      One row per trial: ``trial``, the overrides, ``status`` and the final eval metrics.
    """
    if not trials:
        raise ValueError("sweep: get_sweep() returned no trials")
    names = list(names) if names is not None else [f"trial_{i:03d}" for i in range(len(trials))]
    if len(names) != len(trials) or len(set(names)) != len(names):
        raise ValueError(f"sweep: 'names' must be {len(trials)} distinct names, got {names}")
    workdir = pathlib.Path(workdir)
    configs = [apply_overrides(config, trial) for trial in trials]
    keys = list(dict.fromkeys(k for trial in trials for k in trial))
    workdir.mkdir(parents=True, exist_ok=True)
    pool = DevicePool(groups)
    writer_process = jax.process_index() == 0

    def run_trial(index: int, group: list[jax.Device] | None) -> dict[str, Any] | None:
        trial, trial_config = trials[index], configs[index]
        name = names[index]
        trial_dir = workdir / name
        done = trial_dir / "result.json"
        if done.exists():
            print(f"sweep: {name} already finished, skipping", flush=True)
            return json.loads(done.read_text())
        where = f" on devices {[d.id for d in group]}" if group else ""
        print(f"sweep: {name} {trial}{where}", flush=True)
        trial_config, extra = on_group(trial_config, group, name)
        try:
            result = train_fn(trial_config, trial_dir, **extra)
            status = "interrupted" if result.get("interrupted") else "finished"
        except TrainingDivergedError as error:
            print(f"sweep: {name} diverged: {error}", flush=True)
            result, status = {"eval": {metric: float("nan")}}, "diverged"
        if status == "interrupted":  # resumable: no result.json
            return None
        result = {
            "overrides": trial,
            "status": status,
            "eval": result["eval"],
            "final": result.get("final", {}),
        }
        if writer_process:
            trial_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(done, json.dumps(result))
        return result

    with sigterm_stops():
        results = pool.map(lambda index, group: run_trial(index, group), range(len(trials)))
    if any(result is None for result in results):
        raise SweepInterruptedError(
            "sweep interrupted: running trials saved a checkpoint; rerun the same command to resume"
        )
    rows = [
        {"trial": name, **trial, "status": r["status"], **r["eval"], **_final(r)}
        for name, trial, r in zip(names, trials, results, strict=True)
    ]
    if writer_process:
        write_outputs(rows, keys, workdir, metric)
    return rows
