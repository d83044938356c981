"""Sequence packing: rows of several examples, and a packed model computes what each
example alone gives (loss, logits), through the task's own loss function."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax import models
from attn_jax.data.copy_tasks import CopyConfig, make_copy
from attn_jax.data.mqar import IGNORE
from attn_jax.data.packing import example_lengths, pack
from attn_jax.train.sweep import apply_overrides
from attn_jax.train.tasks import build_task, init_params
from attn_jax.train.validate import ConfigError, validate_train_config


def test_pack_places_examples_greedily_with_their_own_positions():
    labels = np.full((3, 6), IGNORE)
    labels[0, :3] = 1  # example lengths 3, 5, 2
    labels[1, 4] = 2
    labels[2, 1] = 3
    inputs = np.arange(18).reshape(3, 6) + 1
    packed = pack(inputs, labels, row_length=8)
    np.testing.assert_array_equal(example_lengths(labels), [3, 5, 2])
    np.testing.assert_array_equal(
        packed["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(packed["token_positions"][0], [0, 1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(packed["inputs"][0], [1, 2, 3, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(packed["inputs"][1, :2], [13, 14])
    assert (packed["labels"][1, 2:] == IGNORE).all()
    with pytest.raises(ValueError, match="pack_length"):
        pack(inputs, labels, row_length=4)


@pytest.mark.parametrize("kernel", ["dot_product", "flash"])
def test_packed_examples_get_the_losses_they_get_alone(kernel):
    spec = CopyConfig(num_symbols=8, min_len=1, max_len=6)
    data = make_copy(spec, 6, seed=0)
    options = models.TransformerOptions(
        width=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=64, attention=kernel,
        positions="learned",
    )  # fmt: skip
    model = models.TransformerLM(spec.vocab_size, options)
    params = model.init(jax.random.key(0), jnp.asarray(data["inputs"]))["params"]
    packed = pack(data["inputs"], data["labels"], row_length=40)
    assert len(packed["inputs"]) < len(data["inputs"])  # several examples share rows

    def losses(logits, labels):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return jnp.where(labels != IGNORE, ce, 0.0)

    alone = losses(model.apply({"params": params}, data["inputs"]), data["labels"])
    together = losses(
        model.apply(
            {"params": params},
            packed["inputs"],
            positions=packed["token_positions"],
            segment_ids=packed["segment_ids"],
        ),
        packed["labels"],
    )
    lengths = example_lengths(data["labels"])
    flat = np.asarray(together).reshape(-1)
    starts = np.flatnonzero(
        (packed["token_positions"].reshape(-1) == 0) & (packed["segment_ids"].reshape(-1) > 0)
    )
    for example, start in enumerate(starts):
        n = lengths[example]
        np.testing.assert_allclose(flat[start : start + n], alone[example, :n], atol=1e-5)


def _copy_config(**overrides):
    config = importlib.import_module("configs.copy").get_config("quick")
    base = {"data.num_train": 32, "data.num_eval": 8, "train.batch_size": 8, "model.num_layers": 1}
    return apply_overrides(config, {**base, **overrides})


def test_packed_copy_task_trains_on_packed_rows_and_evaluates_unpacked():
    config = _copy_config(**{"data.pack": True})
    validate_train_config(config, num_devices=1)
    task = build_task(config)
    batch = task.train.batch(0, 4)
    assert {"segment_ids", "token_positions"} <= set(batch)
    assert len(task.train) < 32 and "segment_ids" not in task.eval.batch(0, 4)
    params = init_params(task, jax.random.key(0))
    loss, metrics = jax.jit(task.loss_fn, static_argnums=3)(params, batch, jax.random.key(1), True)
    assert np.isfinite(loss) and 0.0 <= float(metrics["sequence_accuracy"]) <= 1.0
    with pytest.raises(ConfigError, match=r"config\.data\.pack"):
        validate_train_config(
            _copy_config(**{"data.pack": True, "model.attention": "linear"}), num_devices=1
        )
    with pytest.raises(ConfigError, match=r"config\.data\.pack_length"):
        validate_train_config(
            _copy_config(**{"data.pack": True, "data.pack_length": 8}), num_devices=1
        )
