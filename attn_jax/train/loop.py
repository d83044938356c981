"""One training loop for every task: pmapped steps, evaluation, checkpoints, metrics."""

from __future__ import annotations

import json
import pathlib
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
from attn_jax.train.metrics import PLOT_LOCK, MetricsWriter, plot_learning_curve
from attn_jax.train.optim import make_optimizer
from attn_jax.train.state import TrainState
from attn_jax.train.tasks import Task, build_task, init_params
from attn_jax.train.termination import sigterm_stops, stop_requested

__all__ = ["TrainingDivergedError", "train_and_evaluate"]

AXIS = "devices"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def _devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
    """The first ``config.train.num_devices`` local devices (all of them for 0)."""
    devices = jax.local_devices()
    wanted = config.train.get("num_devices", 0) or len(devices)
    if wanted > len(devices):
        raise ValueError(
            f"config.train.num_devices: {wanted} requested, {len(devices)} local devices"
        )
    return devices[:wanted]


def _shard(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """This process's rows of a global batch, split over its devices:
    ``[batch, ...]`` -> ``[devices, batch // (processes * devices), ...]``.

    With several processes (multi-host), process ``p`` takes the ``p``-th contiguous slice,
    so the global batch is the same as on one host with all the devices.
    """
    processes, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        rows = value.shape[0] // processes
        local = value[index * rows : (index + 1) * rows]
        out[key] = local.reshape(num_devices, -1, *value.shape[1:])
    return out


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


def _first_replica(tree: Any) -> Any:
    """Host numpy copy of device 0's replica of a pmapped pytree, read from this process's
    own shard: no operation on the (multi-process) global array, hence no collective that
    other processes would have to join."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def _say(message: str, label: str = "") -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(f"{label}{message}", flush=True)


def evaluate(task: Task, p_eval, params, batch_size: int, num_devices: int) -> dict[str, float]:
    """Mean metrics over the whole eval set (its size is a multiple of ``batch_size``)."""
    totals: dict[str, float] = {}
    count = 0
    for batch in task.eval.batches(batch_size):
        metrics = _first_replica(p_eval(params, _shard(batch, num_devices)))
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    return {name: total / count for name, total in totals.items()}


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
      TrainingDivergedError: the loss became NaN/inf (no checkpoint of it is written).
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
    if writer_process:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        (workdir / "versions.json").write_text(json.dumps(_versions(), indent=2))
    checkpoints = Checkpoints(workdir / "checkpoints", keep=train.keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    resumed_from = None
    if restored is not None:
        state, resumed_from = restored, int(restored.step)
        _say(f"resuming from step {resumed_from}", label)

    train_step, eval_step = _make_steps(task, tx)
    # Several processes: pmap must be given every process's devices (identically), and
    # maps over the local ones; the collectives then span all of them.
    mapped = devices if jax.process_count() == 1 else jax.devices()
    p_train = jax.pmap(train_step, axis_name=AXIS, devices=mapped, donate_argnums=(0,))
    p_eval = jax.pmap(eval_step, axis_name=AXIS, devices=mapped)
    pstate = flax.jax_utils.replicate(state, devices)
    writer = MetricsWriter(workdir, total_steps, label=label) if writer_process else None
    tokens_per_step = train.batch_size * task.tokens_per_example
    step = int(state.step)
    eval_metrics: dict[str, float] = {}
    interrupted = False

    def save(step: int, metrics: dict[str, float] | None) -> None:
        host_state = _first_replica(pstate)
        checkpoints.save(step, host_state, metrics)

    try:
        with sigterm_stops():
            while step < total_steps:
                batch = _shard(task.train.batch(step, train.batch_size), num_devices)
                pstate, metrics = p_train(pstate, batch)
                step += 1
                host = _first_replica(metrics)
                loss = float(host["loss"])
                if not np.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                        f"(step {checkpoints.steps()[-1] if checkpoints.steps() else 'none'}) "
                        "is intact: lower config.optim.learning_rate or check the data"
                    )
                if writer and (step % train.log_every == 0 or step == total_steps):
                    host = {k: float(v) for k, v in host.items()}
                    writer.write(step, "train", host)
                    writer.progress(step, host, tokens_per_step)
                if step % train.eval_every == 0 or step == total_steps:
                    eval_metrics = evaluate(
                        task, p_eval, pstate.params, train.batch_size, num_devices
                    )
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
        final = _final_evaluation(task, _first_replica(pstate.params), workdir, label)
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
