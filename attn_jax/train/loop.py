"""One training loop for every task: pmapped steps, evaluation, checkpoints, metrics."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
from importlib import metadata
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn_jax.train.checkpoints import Checkpoints
from attn_jax.train.metrics import MetricsWriter, plot_learning_curve
from attn_jax.train.optim import make_optimizer
from attn_jax.train.state import TrainState
from attn_jax.train.tasks import Task, build_task, init_params

__all__ = ["TrainingDivergedError", "train_and_evaluate"]

AXIS = "devices"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def _devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
    devices = jax.local_devices()
    wanted = config.train.get("num_devices", 0) or len(devices)
    if wanted > len(devices):
        raise ValueError(
            f"config.train.num_devices: {wanted} requested, {len(devices)} local devices"
        )
    return devices[:wanted]


def _shard(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """``[batch, ...]`` -> ``[devices, batch // devices, ...]``."""
    return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _make_steps(task: Task, tx: optax.GradientTransformation):
    def train_step(state: TrainState, batch):
        rng = jax.random.wrap_key_data(state.rng)
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, rng, False)
        grads = jax.lax.pmean(grads, AXIS)
        metrics = jax.lax.pmean(metrics, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, batch):
        _, metrics = task.loss_fn(params, batch, jax.random.key(0), True)
        return jax.lax.pmean(metrics, AXIS)

    return train_step, eval_step


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


class _Termination:
    """Turns SIGTERM into a flag checked between steps (a checkpoint is saved first)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(task: Task, p_eval, params, batch_size: int, num_devices: int) -> dict[str, float]:
    """Mean metrics over the whole eval set (its size is a multiple of ``batch_size``)."""
    totals: dict[str, float] = {}
    count = 0
    for batch in task.eval.batches(batch_size):
        metrics = jax.device_get(p_eval(params, _shard(batch, num_devices)))
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value[0])
        count += 1
    return {name: total / count for name, total in totals.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its newest readable checkpoint.

    Writes ``config.json``, ``versions.json``, ``metrics.jsonl``, ``tensorboard/``,
    ``checkpoints/`` and ``learning_curve.png``.

    Returns:
      ``{"step": final step, "eval": final eval metrics, "resumed_from": step or None,
      "interrupted": bool}``.

    Raises:
      TrainingDivergedError: the loss became NaN/inf (no checkpoint of it is written).
    """
    workdir = pathlib.Path(workdir)
    train = config.train
    task = build_task(config)
    devices = _devices(config)
    num_devices = len(devices)
    total_steps = train.steps
    tx = make_optimizer(config.optim, total_steps)

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    params = init_params(task, init_rng)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_rng),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (workdir / "versions.json").write_text(json.dumps(_versions(), indent=2))
    checkpoints = Checkpoints(workdir / "checkpoints", keep=train.keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    resumed_from = None
    if restored is not None:
        state, resumed_from = restored, int(restored.step)
        print(f"resuming from step {resumed_from}", flush=True)

    train_step, eval_step = _make_steps(task, tx)
    p_train = jax.pmap(train_step, axis_name=AXIS, devices=devices, donate_argnums=(0,))
    p_eval = jax.pmap(eval_step, axis_name=AXIS, devices=devices)
    pstate = flax.jax_utils.replicate(state, devices)
    writer = MetricsWriter(workdir, total_steps)
    tokens_per_step = train.batch_size * task.tokens_per_example
    step = int(state.step)
    eval_metrics: dict[str, float] = {}
    interrupted = False

    def save(step: int, metrics: dict[str, float] | None) -> None:
        host_state = jax.device_get(jax.tree.map(lambda x: x[0], pstate))
        checkpoints.save(step, host_state, metrics)

    try:
        with _Termination() as termination:
            while step < total_steps:
                batch = _shard(task.train.batch(step, train.batch_size), num_devices)
                pstate, metrics = p_train(pstate, batch)
                step += 1
                loss = float(metrics["loss"][0])
                if not np.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                        f"(step {checkpoints.steps()[-1] if checkpoints.steps() else 'none'}) "
                        "is intact: lower config.optim.learning_rate or check the data"
                    )
                if step % train.log_every == 0 or step == total_steps:
                    host = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
                    writer.write(step, "train", host)
                    writer.progress(step, host, tokens_per_step)
                if step % train.eval_every == 0 or step == total_steps:
                    eval_metrics = evaluate(
                        task, p_eval, pstate.params, train.batch_size, num_devices
                    )
                    writer.write(step, "eval", eval_metrics)
                    print(
                        f"eval step {step}: "
                        + " | ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()),
                        flush=True,
                    )
                    save(step, eval_metrics)
                elif step % train.checkpoint_every == 0:
                    save(step, None)
                if termination.requested:
                    print(f"SIGTERM: saving a checkpoint at step {step} and stopping", flush=True)
                    save(step, None)
                    interrupted = True
                    break
    finally:
        writer.close()
        checkpoints.close()
    if (workdir / "metrics.jsonl").stat().st_size:
        plot_learning_curve(workdir / "metrics.jsonl", workdir / "learning_curve.png")
    return {
        "step": step,
        "eval": eval_metrics,
        "resumed_from": resumed_from,
        "interrupted": interrupted,
    }
