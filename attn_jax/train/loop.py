"""One training loop for every task: pmapped steps, evaluation, checkpoints, metrics.

The host never waits for a step: batches are built and placed ahead on a background thread
(:mod:`attn_jax.train.prefetch`), and a step's results stay on the devices until a log,
evaluation or checkpoint step reads them. A NaN/inf loss freezes the state on the devices
(:class:`~attn_jax.train.state.Divergence`); the next read raises, naming that step.
"""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from attn_jax.data.pipeline import TrainBatches
from attn_jax.train.checkpoints import Checkpoints
from attn_jax.train.metrics import PLOT_LOCK, MetricsWriter, plot_learning_curve
from attn_jax.train.optim import make_optimizer
from attn_jax.train.parallelism import DataParallel, SequenceParallel
from attn_jax.train.state import Divergence, TrainState
from attn_jax.train.tasks import Task, build_task, init_params
from attn_jax.train.termination import sigterm_stops, stop_requested

__all__ = ["TrainingDivergedError", "train_and_evaluate"]


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is left
    intact."""


def _devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
    """The first ``config.train.num_devices`` local devices (all of them for 0)."""
    devices = jax.local_devices()
    wanted = config.train.get("num_devices", 0) or len(devices)
    if wanted > len(devices):
        raise ValueError(
            f"config.train.num_devices: {wanted} requested, {len(devices)} local devices"
        )
    return devices[:wanted]


def _versions() -> dict[str, str]:
    packages = ["attn_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        root = pathlib.Path(__file__).resolve().parents[2]
        versions["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = "unknown"
    return versions


def _say(message: str, label: str = "") -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(f"{label}{message}", flush=True)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: list[jax.Device] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its newest readable checkpoint.

    Writes ``config.json``, ``versions.json``, ``metrics.jsonl``, ``tensorboard/``,
    ``checkpoints/`` and ``learning_curve.png``; once training is complete, the task's
    final evaluation of the last parameters (``final_metrics.json``) and example attention
    heatmaps (``attention/*.png``). With several processes
    (``jax.distributed``), each feeds its slice of the global batch to its local devices,
    every process takes part in checkpointing (the workdir must be shared) and only
    process 0 writes the other files and prints.

    Args:
      config: a validated training config.
      workdir: the run directory.
      devices: local devices to train on (default: ``config.train.num_devices`` of them);
        parallel sweeps pass each trial its own group.
      label: prefix of every console line (parallel sweeps pass the trial name).

    Returns:
      ``{"step": final step, "eval": final eval metrics, "final": the task's final
      evaluation (process 0; empty if interrupted or the task has none), "resumed_from":
      step or None, "interrupted": bool}``.

    Raises:
      TrainingDivergedError: the loss or gradient norm became NaN/inf. Raised at the next
        log, eval or checkpoint step, naming the first such step; from that step on the
        state stopped changing, and no checkpoint was written after it.
    """
    workdir = pathlib.Path(workdir)
    train = config.train
    task = build_task(config)
    devices = devices or _devices(config)
    if jax.process_count() > 1 and len(devices) != jax.local_device_count():
        raise ValueError(
            "config.train.num_devices: a multi-process run uses every local device "
            f"({jax.local_device_count()}); got {len(devices)}"
        )
    writer_process = jax.process_index() == 0
    total_steps = train.steps
    tx = make_optimizer(config.optim, total_steps, config.model.get("width"))

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    params = init_params(task, init_rng)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_rng),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    if writer_process:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        (workdir / "versions.json").write_text(json.dumps(_versions(), indent=2))
    checkpoints = Checkpoints(workdir / "checkpoints", keep=train.keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    resumed_from, loader_state = None, None
    if restored is not None:
        state, loader_state = restored
        resumed_from = int(state.step)
        _say(f"resuming from step {resumed_from}", label)

    seq = train.get("sequence_parallel", 1)
    if seq > 1:
        strategy = SequenceParallel(task, tx, devices, seq)
    else:
        strategy = DataParallel(task, tx, devices)
    pstate, divergence = strategy.place(state), strategy.place(Divergence.none())
    writer = MetricsWriter(workdir, total_steps, label=label) if writer_process else None
    tokens_per_step = train.batch_size * task.tokens_per_example
    step = int(state.step)
    eval_metrics: dict[str, float] = {}
    interrupted = False

    def check_divergence() -> None:
        """Raises if a step's loss or gradient norm was NaN/inf (a small device read)."""
        found = strategy.host(divergence)
        if not int(found.step):
            return
        loss, grad_norm = float(found.loss), float(found.grad_norm)
        what = f"loss is {loss}"
        if np.isfinite(loss):
            what = f"gradient norm is {grad_norm} (loss {loss:.4g})"
        saved = checkpoints.steps()
        raise TrainingDivergedError(
            f"{what} at step {int(found.step)}; stopping. The last good checkpoint "
            f"(step {saved[-1] if saved else 'none'}) is intact: lower "
            "config.optim.learning_rate or check the data"
        )

    batches = TrainBatches(
        functools.partial(_train_batch, task.train, train.batch_size),
        strategy.place_batch,
        stop=total_steps,
        workers=config.data.get("workers", 0),
    )
    if loader_state is not None:
        batches.restore(loader_state)
    else:
        batches.start_at(step)

    def save(step: int, metrics: dict[str, float] | None) -> None:
        check_divergence()  # never a checkpoint of a diverged state
        checkpoints.save(step, strategy.host(pstate), metrics, loader=batches.state())

    try:
        with sigterm_stops(), batches:
            # The host reads the device only here and there: the divergence record at log,
            # eval and checkpoint steps, the metrics at log steps.
            for batch_step, batch in batches:
                pstate, divergence, metrics = strategy.train(pstate, divergence, batch)
                step = batch_step + 1
                last = step == total_steps
                log = step % train.log_every == 0 or last
                evaluate = step % train.eval_every == 0 or last
                if log or evaluate:
                    check_divergence()
                if writer and log:
                    host = {k: float(v) for k, v in strategy.host(metrics).items()}
                    writer.write(step, "train", host)
                    writer.progress(step, host, tokens_per_step)
                if evaluate:
                    eval_metrics = strategy.evaluate(pstate, task.eval, train.batch_size)
                    if writer:
                        writer.write(step, "eval", eval_metrics)
                    _say(
                        f"eval step {step}: "
                        + " | ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()),
                        label,
                    )
                    save(step, eval_metrics)
                elif step % train.checkpoint_every == 0:
                    save(step, None)
                if stop_requested():
                    _say(f"SIGTERM: saving a checkpoint at step {step} and stopping", label)
                    save(step, None)
                    interrupted = True
                    break
    finally:
        if writer:
            writer.close()
        checkpoints.close()
    if writer and (workdir / "metrics.jsonl").stat().st_size:
        plot_learning_curve(workdir / "metrics.jsonl", workdir / "learning_curve.png")
    final: dict[str, Any] = {}
    if writer_process and not interrupted:
        final = _final_evaluation(task, strategy.host(pstate.params), workdir, label)
    if jax.process_count() > 1:  # the others wait for process 0's evaluation and plots
        multihost_utils.sync_global_devices("attn_jax: final evaluation done")
    return {
        "step": step,
        "eval": eval_metrics,
        "final": final,
        "resumed_from": resumed_from,
        "interrupted": interrupted,
    }


def _final_evaluation(task: Task, params: Any, workdir: pathlib.Path, label: str) -> dict:
    """The task's final evaluation (``final_metrics.json``) and example attention plots
    (``attention/*.png``) for the trained ``params``."""
    final: dict[str, Any] = {}
    if task.final_eval is not None:
        final = task.final_eval(params)
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        scalars = {k: v for k, v in final.items() if isinstance(v, float)}
        _say("final evaluation: " + " | ".join(f"{k} {v:.4g}" for k, v in scalars.items()), label)
    if task.plot_examples is not None:
        try:
            with PLOT_LOCK:
                paths = task.plot_examples(params, workdir / "attention")
        except Exception as error:  # a picture must not cost the finished run its summary
            _say(f"warning: attention plots failed: {type(error).__name__}: {error}", label)
        else:
            where = f"{len(paths)} in {workdir / 'attention'}" if paths else "none (no weights)"
            _say(f"attention plots: {where}", label)
    return final


def _train_batch(dataset: Any, batch_size: int, step: int) -> dict[str, Any]:
    """The batch of training ``step`` (module level: worker processes pickle it)."""
    return dataset.batch(step, batch_size)
