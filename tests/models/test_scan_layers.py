"""Scanned and rematerialised layer stacks (``options.scan_layers``, ``options.remat``) equal
the unrolled stack with the same weights: outputs, gradients, decoding, sowed weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attn_jax import decode, models
from attn_jax.models.layer_stack import LAYER_AXES
from attn_jax.train.tasks import transformer_options
from tests.models.random_params import random_params

VOCAB = 23
BASE = models.TransformerOptions(
    width=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=32,
    max_len=16,
    attention="dot_product",
    positions="rope",
)


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(3, VOCAB, shape), jnp.int32)


def _forward_and_grads(model, params, *args, **kwargs):
    """Outputs (with ``mutable``: and the variables) and the gradient of a random projection
    of the outputs, in one jitted program."""

    def loss(params):
        out = model.apply({"params": params}, *args, **kwargs)
        logits = out[0] if isinstance(out, tuple) else out
        weights = jax.random.normal(jax.random.key(7), logits.shape)
        return jnp.sum(logits * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads


def _assert_trees_close(actual, expected, atol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=atol, rtol=0)


# Packed rows: segments with their own positions (the causal, segmented path).
TOKENS = _tokens((2, 8))
PACKING = dict(
    segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 2]]),
    positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]]),
)


def test_scanned_rematerialised_lm_with_packing_equals_the_unrolled_lm():
    unrolled = models.TransformerLM(VOCAB, BASE)
    scanned = models.TransformerLM(VOCAB, dataclasses.replace(BASE, scan_layers=True, remat="full"))
    params = random_params(unrolled, TOKENS)
    expected, expected_grads = _forward_and_grads(unrolled, params, TOKENS, **PACKING)
    out, grads = _forward_and_grads(scanned, models.stack_layer_params(params), TOKENS, **PACKING)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert grads["layers"]["mlp"]["hidden"]["kernel"].shape == (2, 16, 32)  # [layers, ...]
    _assert_trees_close(models.unstack_layer_params(grads), expected_grads, atol=1e-4)


def test_scanned_encoder_equals_the_rematerialised_unrolled_one_and_sows_per_layer():
    # The two other corners, against each other (the LM test checks scan + remat against
    # the plain loop; compilation is CI time): scan without remat, remat without scan.
    tokens = _tokens((2, 7)).at[1, 4:].set(0)  # padded: the stack gets a key mask
    options = dataclasses.replace(BASE, positions="learned")
    unrolled = models.TransformerEncoder(
        VOCAB, 3, dataclasses.replace(options, remat="dots_with_no_batch_dims")
    )
    scanned = models.TransformerEncoder(VOCAB, 3, dataclasses.replace(options, scan_layers=True))
    params = random_params(unrolled, tokens)
    assert "layer_1" in params["encoder"]  # remat keeps the unrolled names
    kwargs = dict(sow_weights=True, mutable=["intermediates"])
    (expected, expected_sowed), expected_grads = _forward_and_grads(
        unrolled, params, tokens, **kwargs
    )
    (out, sowed), grads = _forward_and_grads(
        scanned, models.stack_layer_params(params), tokens, **kwargs
    )
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    _assert_trees_close(models.unstack_layer_params(grads), expected_grads, atol=1e-4)
    (weights,) = sowed["intermediates"]["encoder"]["layers"]["attention"]["attention_weights"]
    assert weights.shape == (2, 2, 4, 8, 8)  # [layers, batch, heads, q, kv] (+ the cls token)
    _assert_trees_close(models.unstack_layer_params(sowed), expected_sowed, atol=1e-5)


def test_scanned_encoder_decoder_decodes_the_same_tokens():
    # Both caches: causal self-attention, and cross-attention filled once from the memory.
    src = _tokens((2, 5)).at[1, 3:].set(0)
    options = dataclasses.replace(BASE, positions="sinusoidal")
    unrolled = models.EncoderDecoder(VOCAB, VOCAB, options)
    scanned = models.EncoderDecoder(
        VOCAB, VOCAB, dataclasses.replace(options, scan_layers=True, remat="dots")
    )
    params = random_params(unrolled, src, src, seed=1, std=1.0)  # tokens that vary
    expected = decode.translate(unrolled, params, src, max_len=6, bos_id=1)
    tokens = decode.translate(scanned, models.stack_layer_params(params), src, max_len=6, bos_id=1)
    np.testing.assert_array_equal(tokens, expected)
    assert len(np.unique(expected)) > 2  # not a constant sequence


def test_scanned_caches_keep_the_batch_axis_first():
    # Beam search tiles and reorders every cache array along its leading (batch) axis.
    lm = models.TransformerLM(VOCAB, dataclasses.replace(BASE, scan_layers=True))
    cache = decode.init_cache(lm, jnp.zeros((3, 10), jnp.int32))
    layers = cache["layers"]["attention"]
    # [batch, layers, kv_heads, len, dim]
    assert layers["cached_key"].shape == (3, 2, 2, 10, 4)
    assert layers["cache_lengths"].shape == (3, 2)
    assert LAYER_AXES["cache"] == 1
    unstacked = models.unstack_layer_params(cache, axis=LAYER_AXES["cache"])
    assert unstacked["layer_1"]["attention"]["cached_key"].shape == (3, 2, 10, 4)


def test_scanned_layers_get_their_own_initialisation_and_dropout():
    options = dataclasses.replace(BASE, scan_layers=True, dropout_rate=0.5)
    model = models.TransformerLM(VOCAB, options)
    params = jax.jit(model.init)(jax.random.key(0), TOKENS)["params"]
    kernel = params["layers"]["mlp"]["hidden"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # split 'params' rngs
    # Dropout inside the scan (split 'dropout' rngs) traces; compiling it is CI time.
    apply = lambda key: model.apply(
        {"params": params}, TOKENS, deterministic=False, rngs={"dropout": key}
    )
    assert jax.eval_shape(apply, jax.random.key(1)).shape == (2, 8, VOCAB)


def test_stack_and_unstack_layer_params_round_trip_and_check_the_layers():
    tree = {
        "embedder": {"table": jnp.ones((3, 2))},
        "encoder": {f"layer_{i}": {"w": jnp.full((2, 3), i)} for i in range(3)},
    }
    stacked = models.stack_layer_params(tree)
    assert stacked["encoder"]["layers"]["w"].shape == (3, 2, 3)
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["w"][2], 2)
    _assert_trees_close(models.unstack_layer_params(stacked), tree, atol=0)
    assert models.stack_layer_params(tree, axis=1)["encoder"]["layers"]["w"].shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"layers \[0, 2\]; expected layer_0 \.\.\. layer_1"):
        models.stack_layer_params({"layer_0": {"w": 1.0}, "layer_2": {"w": 2.0}})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("remat", "dots_saveable", r"options.remat: expected one of \('none', 'full', 'dots'"),
        ("scan_layers", "yes", "options.scan_layers: expected a bool"),
    ],
)
def test_bad_layer_options_raise_naming_the_field(field, value, message):
    options = dataclasses.replace(BASE, **{field: value})
    with pytest.raises(ValueError, match=message):
        models.TransformerLM(VOCAB, options).init(jax.random.key(0), _tokens((1, 4)))
    config = ml_collections.ConfigDict({"num_layers": 2, field: value})
    with pytest.raises(ValueError, match=message.replace("options.", "config.model.")):
        transformer_options(config, max_len=16)
