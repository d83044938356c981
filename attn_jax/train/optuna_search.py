"""Optuna search backend for ``launch.py --sweep --sweep_backend=optuna``.

A config file declares ``get_search_space(arg)``, a dict from dotted config paths to
:func:`uniform`, :func:`log_uniform`, :func:`integers` or :func:`categorical`. The study
lives in an optuna storage (default ``sqlite:///<workdir>/optuna.db``): several processes
or machines pointing at the same storage URL and workdir share one study, each asking it
for the next trial. Trial ``n`` runs in ``<workdir>/trial_NNN`` like a grid trial.

Resuming: a trial stopped by SIGTERM is re-queued with the same parameters when the study
is run again and resumes from its checkpoint; a process that died without a word (its
heartbeat went stale) has its trial retried the same way by the next process to start a
trial.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from attn_jax.train.loop import TrainingDivergedError
from attn_jax.train.sweep import (
    DevicePool,
    SweepInterruptedError,
    TrainFn,
    apply_overrides,
    on_group,
    write_outputs,
)
from attn_jax.train.termination import sigterm_stops, stop_requested

__all__ = [
    "Param",
    "categorical",
    "default_storage",
    "integers",
    "log_uniform",
    "run_study",
    "uniform",
]

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config value; build it with the helpers below."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "uniform":
            return trial.suggest_float(name, self.low, self.high)
        if self.kind == "log_uniform":
            return trial.suggest_float(name, self.low, self.high, log=True)
        if self.kind == "integers":
            return trial.suggest_int(name, self.low, self.high)
        return trial.suggest_categorical(name, list(self.choices))


def _check_range(kind: str, low: float, high: float) -> None:
    if not low < high:
        raise ValueError(f"{kind}: expected low < high, got low={low}, high={high}")


def uniform(low: float, high: float) -> Param:
    """A float drawn from ``[low, high]``."""
    _check_range("uniform", low, high)
    return Param("uniform", float(low), float(high))


def log_uniform(low: float, high: float) -> Param:
    """A positive float drawn log-uniformly from ``[low, high]`` (learning rates)."""
    _check_range("log_uniform", low, high)
    if low <= 0:
        raise ValueError(f"log_uniform: low must be > 0, got {low}")
    return Param("log_uniform", float(low), float(high))


def integers(low: int, high: int) -> Param:
    """An integer from ``low`` to ``high`` inclusive."""
    _check_range("integers", low, high)
    return Param("integers", int(low), int(high))


def categorical(choices: Sequence[Any]) -> Param:
    """One of ``choices`` (str, int, float, bool or None)."""
    if not choices:
        raise ValueError("categorical: expected at least one choice")
    return Param("categorical", choices=tuple(choices))


def default_storage(workdir: str | pathlib.Path) -> str:
    """``sqlite:///<absolute workdir>/optuna.db``."""
    return f"sqlite:///{pathlib.Path(workdir).absolute() / 'optuna.db'}"


def run_study(
    config: ml_collections.ConfigDict,
    space: dict[str, Param],
    workdir: str | pathlib.Path,
    train_fn: TrainFn,
    *,
    num_trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int | None = None,
    metric: str = "accuracy",
    groups: Sequence[Sequence[jax.Device]] | None = None,
    validate: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs the study until it holds ``num_trials`` finished trials, then writes the sweep
    summaries (``sweep.csv``, ``leaderboard.md``, ``sweep.png``) over all of them.

    Args:
      config: the base config; suggested values override copies of it.
      space: dotted config path -> :class:`Param`.
      workdir: trial directories and the default SQLite storage.
      train_fn: as in :func:`attn_jax.train.sweep.run_sweep`.
      num_trials: finished (or diverged) trials wanted in the study, counting other
        processes' trials.
      storage: optuna storage URL (default :func:`default_storage`).
      study_name: default: the workdir's name.
      seed: sampler seed (``None``: random; processes sharing a study should differ).
      metric: eval metric maximised.
      groups: device groups; one trial at a time runs on each, in threads.
      validate: called on each trial's config before it runs (raise to reject).

    Returns:
      One row per finished trial of the study (all processes'), in trial order.
    """
    import optuna
    from optuna.trial import TrialState

    if not space:
        raise ValueError("optuna: get_search_space() returned no parameters")
    if num_trials < 1:
        raise ValueError(f"--optuna_trials: expected a positive count, got {num_trials}")
    for path in space:
        apply_overrides(config, {path: None})  # unknown keys fail before anything runs
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or default_storage(workdir)
    study = _open_study(url, study_name or workdir.name, seed)
    _requeue_interrupted(study)
    pool = DevicePool(groups)
    counted = (TrialState.COMPLETE, TrialState.PRUNED)  # pruned = diverged

    def finished() -> int:
        return len(study.get_trials(deepcopy=False, states=counted))

    def objective(trial: optuna.Trial) -> float:
        overrides = {path: param.suggest(trial, path) for path, param in space.items()}
        name = _trial_dir_name(trial)
        trial.set_user_attr("workdir", name)
        trial_config = apply_overrides(config, overrides)
        with pool.acquire() as group:
            trial_config, extra = on_group(trial_config, group, name)
            if validate is not None:
                validate(trial_config)
            print(f"optuna: {name} {overrides}", flush=True)
            try:
                result = train_fn(trial_config, workdir / name, **extra)
            except TrainingDivergedError as error:
                print(f"optuna: {name} diverged: {error}", flush=True)
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("eval", {metric: float("nan")})
                raise optuna.TrialPruned(f"diverged: {error}") from error
        if result.get("interrupted"):
            trial.set_user_attr("status", "interrupted")
            raise SweepInterruptedError(f"optuna: {name} interrupted by SIGTERM")
        trial.set_user_attr("status", "finished")
        trial.set_user_attr("eval", dict(result["eval"]))
        return float(result["eval"][metric])

    def stop_when_done(study: optuna.Study, trial: Any) -> None:
        del trial
        if finished() >= num_trials or stop_requested():
            study.stop()

    remaining = num_trials - finished()
    if remaining > 0:
        with sigterm_stops():
            try:
                study.optimize(
                    objective,
                    n_trials=remaining,
                    n_jobs=len(pool),
                    callbacks=[stop_when_done],
                    catch=(),
                )
            except SweepInterruptedError as error:
                raise SweepInterruptedError(
                    "optuna sweep interrupted: running trials saved a checkpoint; rerun the "
                    "same command to resume them"
                ) from error
    else:
        print(f"optuna: study already holds {finished()} finished trials", flush=True)
    rows = _rows(study, list(space), metric)
    if jax.process_index() == 0 and rows:
        write_outputs(rows, list(space), workdir, metric)
    return rows


def _open_study(url: str, name: str, seed: int | None) -> Any:
    """Creates or loads the study. Processes starting together on a fresh database may
    race to create its tables: the loser retries."""
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    for attempt in range(5):
        try:
            storage: Any = url
            if url.startswith(("sqlite", "postgresql", "mysql")):
                sqlite = url.startswith("sqlite")
                storage = RDBStorage(
                    url,
                    engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=_requeue_stale,
                )
            return optuna.create_study(
                storage=storage,
                study_name=name,
                direction="maximize",
                sampler=optuna.samplers.TPESampler(seed=seed),
                load_if_exists=True,
            )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _trial_dir_name(trial: Any) -> str:
    """A re-queued trial reuses the directory (and checkpoints) of the one it replaces; a
    new trial gets ``trial_NNN`` from its number."""
    return trial.user_attrs.get("workdir") or f"trial_{trial.number:03d}"


def _requeue_stale(study: Any, trial: Any) -> None:
    """A trial whose process stopped beating (killed, machine lost): run it again."""
    if "workdir" in trial.user_attrs:
        _requeue(study, trial)


def _requeue(study: Any, trial: Any) -> None:
    """Enqueues ``trial`` again with its parameters and directory."""
    study.enqueue_trial(
        trial.params,
        user_attrs={"workdir": trial.user_attrs["workdir"], "requeued_from": trial.number},
    )


def _requeue_interrupted(study: Any) -> None:
    """Enqueues, once, every trial a SIGTERM interrupted, with its parameters and workdir."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    for trial in trials:
        interrupted = trial.user_attrs.get("status") == "interrupted"
        if trial.state == TrialState.FAIL and interrupted and trial.number not in requeued:
            _requeue(study, trial)


def _rows(study: Any, keys: list[str], metric: str) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False):
        status = trial.user_attrs.get("status")
        done = trial.state == TrialState.COMPLETE or status == "diverged"
        if not done:
            continue
        scores = trial.user_attrs.get("eval", {metric: float("nan")})
        rows.append(
            {
                "trial": trial.user_attrs.get("workdir", f"trial_{trial.number:03d}"),
                **{k: trial.params.get(k) for k in keys},
                "status": status,
                **scores,
            }
        )
    return rows
