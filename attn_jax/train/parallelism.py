"""How a training step is spread over devices: data parallel (``pmap``), or data x sequence
parallel (``shard_map`` over a 2-D mesh, ring attention across the sequence axis).

Both strategies give the training loop the same five operations: ``place`` the state on the
devices, ``place_batch`` a global batch (the loop does it ahead, on a background thread),
run a ``train`` step, ``evaluate`` a dataset, and copy a placed tree back to the ``host``.
A train step returns device arrays and never waits for the device: the host reads them
only when it asks ``host`` for them.
"""

from __future__ import annotations

from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attn_jax.data.batching import ArrayDataset
from attn_jax.train.state import Divergence, TrainState
from attn_jax.train.tasks import Task
from attn_jax.train.tasks.base import DATA_AXIS, SEQ_AXIS

__all__ = ["DataParallel", "SequenceParallel"]

AXIS = "devices"  # the pmap axis


def _guarded_update(
    tx: optax.GradientTransformation, state: TrainState, divergence: Divergence, grads, metrics
):
    """The optimiser update of ``state``, unless this step's loss or gradient norm is NaN/inf
    or an earlier one was: then ``state`` is returned unchanged, and ``divergence`` names
    the first such step. Returns ``(state, divergence, metrics)``."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics["grad_norm"] = optax.tree.norm(grads)
    divergence = divergence.record(state.step + 1, metrics["loss"], metrics["grad_norm"])
    healthy = divergence.step == 0
    state = jax.tree.map(lambda new, old: jnp.where(healthy, new, old), updated, state)
    return state, divergence, metrics


def _mean_metrics(step, state, dataset: ArrayDataset, batch_size: int) -> dict[str, float]:
    """Mean of ``step(state, batch) -> host metrics`` over ``dataset`` in full batches."""
    totals: dict[str, float] = {}
    count = 0
    for batch in dataset.batches(batch_size):
        for name, value in step(state, batch).items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    return {name: total / count for name, total in totals.items()}


class DataParallel:
    """``jax.pmap`` over ``devices`` with gradients averaged by ``lax.pmean``.

    With several processes (``jax.distributed``), each feeds its contiguous slice of the
    global batch to its local devices and the collectives span every process.
    """

    def __init__(self, task: Task, tx: optax.GradientTransformation, devices: list):
        self.devices = devices
        # The leading (device) axis over this process's devices, as pmap lays out its inputs.
        self._batch_sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))

        def train_step(state: TrainState, divergence: Divergence, batch):
            rng = jax.random.wrap_key_data(state.rng)
            rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
            grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
            (_, metrics), grads = grad_fn(state.params, batch, rng, False)
            grads = jax.lax.pmean(grads, AXIS)
            metrics = jax.lax.pmean(metrics, AXIS)
            return _guarded_update(tx, state, divergence, grads, metrics)

        def eval_step(params, batch):
            _, metrics = task.loss_fn(params, batch, jax.random.key(0), True)
            return jax.lax.pmean(metrics, AXIS)

        # Several processes: pmap must be given every process's devices (identically), and
        # maps over the local ones; the collectives then span all of them.
        mapped = devices if jax.process_count() == 1 else jax.devices()
        self._train = jax.pmap(train_step, axis_name=AXIS, devices=mapped, donate_argnums=(0, 1))
        self._eval = jax.pmap(eval_step, axis_name=AXIS, devices=mapped)

    def _shard(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows of a global batch split over its devices: ``[batch, ...]`` ->
        ``[devices, batch // (processes * devices), ...]`` (process ``p`` takes the
        ``p``-th contiguous slice, so the global batch is that of one host)."""
        processes, index = jax.process_count(), jax.process_index()
        out = {}
        for key, value in batch.items():
            rows = value.shape[0] // processes
            local = value[index * rows : (index + 1) * rows]
            out[key] = local.reshape(len(self.devices), -1, *value.shape[1:])
        return out

    def place(self, tree: Any) -> Any:
        """``tree`` (the state, a :class:`Divergence`) replicated on every device."""
        return flax.jax_utils.replicate(tree, self.devices)

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch, split over and copied to its devices
        (asynchronously)."""
        return jax.device_put(self._shard(batch), self._batch_sharding)

    def host(self, tree: Any) -> Any:
        """Device 0's replica as numpy, read from this process's own shard: no operation on
        the (multi-process) global array, hence no collective other processes must join."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

    def train(
        self, state: TrainState, divergence: Divergence, batch: dict[str, jax.Array]
    ) -> tuple[TrainState, Divergence, dict[str, jax.Array]]:
        """One step on a placed batch (``place_batch``): ``(state, divergence, metrics)``,
        all on device (``state`` and ``divergence`` are donated)."""
        return self._train(state, divergence, batch)

    def evaluate(self, state: TrainState, dataset: ArrayDataset, batch_size: int):
        step = lambda params, batch: self.host(self._eval(params, self.place_batch(batch)))
        return _mean_metrics(step, state.params, dataset, batch_size)


class SequenceParallel:
    """``shard_map`` over a ``(data, seq)`` mesh of ``devices``: every batch array that
    ``task.sequence_parallel`` names is split over both axes (examples over ``data``,
    positions over ``seq``), the others over ``data``; the parameters are replicated.

    The task's sequence-parallel loss runs ring attention across ``seq`` and normalises by
    the global number of predicted tokens, so the gradient of each device's loss, summed
    over the mesh (shard_map's transpose of the replicated parameters), is the gradient of
    the global loss.
    """

    def __init__(
        self, task: Task, tx: optax.GradientTransformation, devices: list, seq_devices: int
    ):
        if task.sequence_parallel is None:
            raise ValueError(
                "config.train.sequence_parallel: this task has no sequence-parallel loss"
            )
        spec = task.sequence_parallel
        grid = np.asarray(devices).reshape(len(devices) // seq_devices, seq_devices)
        self.mesh = Mesh(grid, (DATA_AXIS, SEQ_AXIS))
        self._sequence_keys = spec.sequence_keys
        self._striped = spec.ordering == "striped"
        self._seq_devices = seq_devices
        loss_fn = spec.loss_fn

        def train_step(carry: tuple[TrainState, Divergence], batch):
            state, divergence = carry
            rng = jax.random.wrap_key_data(state.rng)
            for axis in (DATA_AXIS, SEQ_AXIS):
                rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
            rng = jax.random.fold_in(rng, state.step)
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, metrics), grads = grad_fn(state.params, batch, rng, False)
            return _guarded_update(tx, state, divergence, grads, metrics)

        def eval_step(params, batch):
            return loss_fn(params, batch, jax.random.key(0), True)[1]

        self._train = jax.jit(self.mapped(train_step, 3), donate_argnums=(0,))
        self._eval = jax.jit(self.mapped(eval_step, 1))

    def _batch_specs(self, batch: dict[str, np.ndarray]) -> dict[str, P]:
        return {
            k: P(DATA_AXIS, SEQ_AXIS) if k in self._sequence_keys else P(DATA_AXIS) for k in batch
        }

    def mapped(self, fn, num_outputs: int):
        """``fn(replicated, batch) -> outputs`` mapped over the mesh (batch specs follow
        the batch's keys; traced once per batch structure under ``jit``)."""

        def call(replicated, batch):
            return jax.shard_map(
                fn,
                mesh=self.mesh,
                in_specs=(P(), self._batch_specs(batch)),
                out_specs=(P(),) * num_outputs if num_outputs > 1 else P(),
            )(replicated, batch)

        return call

    def place(self, tree: Any) -> Any:
        """``tree`` (the state, a :class:`Divergence`) replicated over the mesh."""
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch in the sequence ordering, sharded over the mesh (asynchronously)."""
        batch = self.order_batch(batch)
        specs = self._batch_specs(batch)
        return {k: jax.device_put(v, NamedSharding(self.mesh, specs[k])) for k, v in batch.items()}

    def host(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

    def order_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Striped ordering: sequence columns dealt round-robin, so that device ``d``'s
        contiguous shard holds positions ``d, d + P, d + 2P, ...``."""
        if not self._striped:
            return batch
        out = dict(batch)
        for key in self._sequence_keys:
            length = batch[key].shape[1]
            order = np.arange(length).reshape(-1, self._seq_devices).T.reshape(-1)
            out[key] = batch[key][:, order]
        return out

    def train(
        self, state: TrainState, divergence: Divergence, batch: dict[str, jax.Array]
    ) -> tuple[TrainState, Divergence, dict[str, jax.Array]]:
        """One step on a placed batch (``place_batch``): ``(state, divergence, metrics)``,
        all on device (``state`` and ``divergence`` are donated)."""
        return self._train((state, divergence), batch)

    def evaluate(self, state: TrainState, dataset: ArrayDataset, batch_size: int):
        step = lambda params, batch: self.host(self._eval(params, self.place_batch(batch)))
        return _mean_metrics(step, state.params, dataset, batch_size)
