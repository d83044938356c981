"""The optimiser's width rule: ``optim.lr_reference_width`` scales the rate as 1 / width."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attn_jax.train.optim import hidden_matrices, make_optimizer, width_factor
from attn_jax.train.validate import ConfigError, validate_train_config
from configs import mqar


def _optim(**fields) -> ml_collections.ConfigDict:
    base = dict(learning_rate=4e-3, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    return ml_collections.ConfigDict({**base, **fields})


def test_the_hidden_rate_scales_as_one_over_width_from_the_reference():
    assert width_factor(_optim()) == 1.0
    assert width_factor(_optim(lr_reference_width=0), 256) == 1.0
    assert width_factor(_optim(lr_reference_width=64), 64) == 1.0
    assert width_factor(_optim(lr_reference_width=64), 256) == 0.25


def test_the_first_adam_step_moves_hidden_matrices_by_the_scaled_rate_only():
    params = {
        "dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
        "embedder": {"embedding": jnp.zeros((4, 2))},
        "attention": {"query": {"kernel": jnp.zeros((2, 1, 2))}},
        "random_features": jnp.zeros((2, 2)),
    }
    assert jax.tree_util.tree_map(bool, hidden_matrices(params)) == {
        "dense": {"kernel": True, "bias": False},
        "embedder": {"embedding": False},
        "attention": {"query": {"kernel": True}},
        "random_features": False,
    }
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * -2.0, params)
    for reference, width, factor in ((0, 256, 1.0), (64, 256, 0.25), (64, 32, 2.0)):
        tx = make_optimizer(_optim(lr_reference_width=reference), 10, width)
        updates, _ = tx.update(grads, tx.init(params), params)
        # Adam's first step is -rate * sign(grad) (bias-corrected moments, tiny eps).
        np.testing.assert_allclose(updates["dense"]["kernel"], 4e-3 * factor, rtol=1e-5)
        np.testing.assert_allclose(
            updates["attention"]["query"]["kernel"], 4e-3 * factor, rtol=1e-5
        )
        np.testing.assert_allclose(updates["dense"]["bias"], 4e-3, rtol=1e-5)
        np.testing.assert_allclose(updates["embedder"]["embedding"], 4e-3, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim.lr_reference_width", -64, "config.optim.lr_reference_width: expected a number"),
        ("model.width", None, "config.optim.lr_reference_width: needs a model with a positive"),
    ],
)
def test_bad_width_rule_settings_name_the_key(key, value, message):
    config = mqar.get_config("quick")
    config.optim.lr_reference_width = 64
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        validate_train_config(config, 1)
