"""Tasks: a dataset, a model and a loss, built from a config (``config.data.name``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn_jax import models
from attn_jax.data.batching import ArrayDataset
from attn_jax.data.mqar import IGNORE, MQARConfig, make_mqar

__all__ = ["TASKS", "Task", "build_task", "transformer_options"]


@dataclasses.dataclass
class Task:
    """What the training loop needs to know about a task.

    Attributes:
      model: the Flax module.
      train / eval: step-indexed datasets of numpy arrays.
      loss_fn: ``(params, batch, rng, deterministic) -> (loss, metrics)`` with scalar
        metrics (``"accuracy"`` is the evaluation metric).
      tokens_per_example: for throughput reporting.
    """

    model: nn.Module
    train: ArrayDataset
    eval: ArrayDataset
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    tokens_per_example: int

    def init_batch(self, batch_size: int = 2) -> dict[str, np.ndarray]:
        return self.train.batch(0, batch_size)


def transformer_options(
    model: ml_collections.ConfigDict, max_len: int
) -> models.TransformerOptions:
    """``TransformerOptions`` from ``config.model`` (unknown fields are an error)."""
    fields = {f.name for f in dataclasses.fields(models.TransformerOptions)}
    values = {k: v for k, v in model.items() if k != "name"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.model: unknown field(s) {unknown}; known: {sorted(fields)}")
    values.setdefault("max_len", max_len)
    for key in ("dtype", "param_dtype"):
        if key in values:
            values[key] = jnp.dtype(values[key])
    if values.get("attention_kwargs") is not None:
        values["attention_kwargs"] = dict(values["attention_kwargs"])
    return models.TransformerOptions(**values)


def _mqar(config: ml_collections.ConfigDict) -> Task:
    data = config.data
    spec = MQARConfig(
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        num_kv_pairs=data.num_kv_pairs,
        power_a=data.get("power_a", 0.01),
    )
    spec.validate("config.data")

    def dataset(num_examples: int, seed: int) -> ArrayDataset:
        inputs, labels = make_mqar(spec, num_examples, seed)
        # Exactly num_kv_pairs answers per example: gather their positions once.
        positions = np.argsort(labels == IGNORE, axis=1, kind="stable")[:, : spec.num_kv_pairs]
        answers = np.take_along_axis(labels, positions, axis=1)
        return ArrayDataset(
            {"inputs": inputs, "positions": positions.astype(np.int32), "answers": answers},
            seed=seed,
        )

    model = models.TransformerLM(spec.vocab_size, transformer_options(config.model, spec.seq_len))

    def loss_fn(params, batch, rng, deterministic):
        logits = model.apply(
            {"params": params},
            batch["inputs"],
            output_positions=batch["positions"],
            deterministic=deterministic,
            rngs={"dropout": rng},
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answers"]).mean()
        accuracy = (jnp.argmax(logits, -1) == batch["answers"]).mean()
        return loss, {"loss": loss, "accuracy": accuracy}

    return Task(
        model=model,
        train=dataset(data.num_train, config.seed),
        eval=dataset(data.num_eval, config.seed + 1),
        loss_fn=loss_fn,
        tokens_per_example=spec.seq_len,
    )


TASKS: dict[str, Callable[[ml_collections.ConfigDict], Task]] = {"mqar": _mqar}


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The task named ``config.data.name``."""
    name = config.data.name
    if name not in TASKS:
        raise ValueError(f"config.data.name: unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](config)


def init_params(task: Task, rng: jax.Array) -> Any:
    """Initial parameters of ``task.model`` (jitted init)."""
    batch = task.init_batch()
    return jax.jit(lambda r: task.model.init(r, batch["inputs"]))(rng)["params"]
