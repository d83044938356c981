"""Data x sequence parallel training: ring attention in every layer, same loss and
gradients as the unsharded model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from attn_jax.train.loop import train_and_evaluate
from attn_jax.train.optim import make_optimizer
from attn_jax.train.parallelism import SequenceParallel
from attn_jax.train.tasks import build_task, init_params
from attn_jax.train.validate import ConfigError, validate_train_config
from configs import mqar


def _config(**overrides):
    config = mqar.get_config("quick")
    config.data.vocab_size = 256
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


SHARDED = {"train.sequence_parallel": 4}  # ring attention in every layer; dot_product evaluates


@pytest.mark.parametrize("ordering", ["striped", "contiguous"])
def test_sharded_loss_and_gradients_equal_the_unsharded_ones(ordering):
    reference = build_task(_config(**{"model.attention": "dot_product"}))
    sharded = build_task(_config(**SHARDED, **{"train.sequence_ordering": ordering}))
    params = init_params(reference, jax.random.key(0))
    batch = reference.train.batch(0, 16)  # positions / answers
    sharded_batch = sharded.train.batch(0, 16)  # the same examples as per-token labels
    np.testing.assert_array_equal(batch["inputs"], sharded_batch["inputs"])

    grad = jax.value_and_grad(reference.loss_fn, has_aux=True)
    (loss, metrics), grads = jax.jit(grad, static_argnums=3)(params, batch, jax.random.key(1), True)

    config = _config()
    tx = make_optimizer(config.optim, 8, config.model.width)
    strategy = SequenceParallel(sharded, tx, jax.devices(), 4)
    assert dict(strategy.mesh.shape) == {"data": 2, "seq": 4}
    loss_fn = sharded.sequence_parallel.loss_fn

    def metrics_and_grads(params, batch):  # this device's loss varies: keep the global ones
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, jax.random.key(1), True
        )
        return metrics, grads

    mapped = jax.jit(strategy.mapped(metrics_and_grads, 2))
    sharded_metrics, sharded_grads = mapped(params, strategy.order_batch(sharded_batch))
    np.testing.assert_allclose(sharded_metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(sharded_metrics["accuracy"], metrics["accuracy"], atol=1e-6)
    for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def _losses(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["split"] == split]


def test_training_with_the_sequence_split_over_four_devices_matches_one_device(tmp_path):
    train_and_evaluate(_config(**{"train.num_devices": 1}), tmp_path / "one")
    result = train_and_evaluate(_config(**SHARDED), tmp_path / "sharded")
    assert result["step"] == 8
    np.testing.assert_allclose(
        _losses(tmp_path / "sharded", "train"), _losses(tmp_path / "one", "train"), rtol=1e-4
    )
    np.testing.assert_allclose(
        _losses(tmp_path / "sharded", "eval"), _losses(tmp_path / "one", "eval"), rtol=1e-4
    )
    again = train_and_evaluate(_config(**SHARDED), tmp_path / "sharded")  # resumes
    assert again["resumed_from"] == 8


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"train.sequence_parallel": 3, "model.attention": "ring"}, "3 does not divide the 8"),
        (
            {"train.sequence_parallel": 4, "model.attention": "linear"},
            "config.model.attention: sequence parallelism .* 'linear' is approximate",
        ),
        ({"train.sequence_parallel": 4, "model.attention": "flash"}, None),
        ({"train.sequence_parallel": 0}, "expected an integer >= 1"),
        (
            {"train.sequence_parallel": 2, "train.sequence_ordering": "zigzag"},
            "config.train.sequence_ordering: expected one of",
        ),
        (
            {
                "train.sequence_parallel": 2,
                "model.attention": "flash",
                "model.attention_kwargs": {"block_q": 16},
            },
            r"config.model.attention_kwargs: \['block_q'\] have no meaning for the ring",
        ),
        (
            {"train.sequence_parallel": 2, "model.attention_dropout_rate": 0.1},
            "config.model.attention_dropout_rate: ring attention",
        ),
        (
            {"train.sequence_parallel": 8, "model.attention": "ring", "train.batch_size": 4},
            None,
        ),
        (
            {"train.sequence_parallel": 2, "model.attention": "ring", "train.batch_size": 6},
            "not divisible by the 4 data-parallel groups",
        ),
    ],
)
def test_sequence_parallel_settings_are_checked(overrides, match):
    config = _config(**overrides)
    if match is None:  # e.g. an 8-way sequence split: the batch needs no split
        validate_train_config(config, 8)
        return
    with pytest.raises(ConfigError, match=match):
        validate_train_config(config, 8)


def test_tasks_without_a_sequence_parallel_loss_are_refused():
    from configs import scan_rnn

    config = scan_rnn.get_config("quick")
    config.train.sequence_parallel = 2
    with pytest.raises(ConfigError, match=r"task 'scan' has no sequence-parallel loss; .* mqar"):
        validate_train_config(config, 8)
