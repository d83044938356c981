"""VisionTransformer on tiny images: shapes, gradients per kernel and dtype, pooling, weights.

Each configuration compiles one program (:func:`_analyse`) whose results are cached.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from attn_jax import kernels
from attn_jax.models import TransformerOptions, VisionTransformer
from tests.models.random_params import random_params

BATCH, SIZE, PATCH, CLASSES = 2, 8, 4, 3
PATCHES = (SIZE // PATCH) ** 2
LAYERS, HEADS = 2, 2
IMAGES = np.random.RandomState(0).randn(BATCH, SIZE, SIZE, 1).astype(np.float32)


def _model(attention="dot_product", dtype="float32", pooling="cls", max_len=PATCHES + 1):
    options = TransformerOptions(
        width=16,
        num_layers=LAYERS,
        num_heads=HEADS,
        mlp_dim=32,
        attention=attention,
        max_len=max_len,
        dtype=jnp.dtype(dtype),
    )
    return VisionTransformer(CLASSES, patch_size=PATCH, options=options, pooling=pooling)


@functools.cache
def _analyse(attention: str, dtype: str, pooling: str) -> dict[str, Any]:
    model = _model(attention, dtype, pooling)
    params = random_params(model, IMAGES, seed=3)
    cotangent = jnp.asarray(np.random.RandomState(4).randn(BATCH, CLASSES), jnp.float32)

    @jax.jit
    def run(params):
        def loss(params):
            logits, state = model.apply(
                {"params": params},
                IMAGES,
                sow_weights=True,
                capture_intermediates=lambda mdl, _: mdl.name == "encoder",
                mutable=["intermediates"],
            )
            return jnp.sum(logits * cotangent), (logits, state["intermediates"])

        (_, (logits, inter)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return {"logits": logits, "grads": grads, "intermediates": inter}

    return jax.tree.map(np.asarray, run(params)) | {"params": params}


# Kernels that can return weights (the tests analyse sown weights): the reference kernel in
# both dtypes, any other in float32.
KERNEL_DTYPES = [pytest.param("dot_product", "bfloat16", "cls", id="dot_product-bfloat16")] + [
    pytest.param(name, "float32", "cls", id=f"{name}-float32")
    for name in kernels.available(interface="dot_product", exact=True)
    if kernels.capabilities(name).weights
]
MEAN = pytest.param("dot_product", "float32", "mean", id="dot_product-float32-mean")


@pytest.mark.parametrize(("attention", "dtype", "pooling"), [*KERNEL_DTYPES, MEAN])
def test_forward_and_gradients(attention, dtype, pooling):
    out = _analyse(attention, dtype, pooling)
    assert out["logits"].shape == (BATCH, CLASSES)
    assert out["logits"].dtype == np.float32
    assert np.all(np.isfinite(out["logits"]))
    assert np.abs(out["logits"][0] - out["logits"][1]).max() > 1e-3, "images not told apart"
    grads = traverse_util.flatten_dict(out["grads"], sep="/")
    params = traverse_util.flatten_dict(out["params"], sep="/")
    assert grads.keys() == params.keys()
    # Positions of the max_len rows are all used (max_len == patches + 1).
    for name, grad in grads.items():
        assert grad.dtype == params[name].dtype, name
        assert np.all(np.isfinite(grad)), f"non-finite gradient for {name}"
        assert np.any(grad != 0), f"zero gradient for {name}"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling(pooling):
    """The head sees the CLS token's output (``cls``) or the mean over patches (``mean``)."""
    out = _analyse("dot_product", "float32", pooling)
    encoded = out["intermediates"]["encoder"]["__call__"][0]
    assert encoded.shape == (BATCH, PATCHES + 1, 16)
    pooled = encoded[:, 0] if pooling == "cls" else encoded[:, 1:].mean(1)
    head = out["params"]["head"]
    expected = pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(out["logits"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("attention", "dtype", "pooling"), KERNEL_DTYPES)
def test_sown_weights_per_layer(attention, dtype, pooling):
    out = _analyse(attention, dtype, pooling)
    encoder = out["intermediates"]["encoder"]
    assert sorted(k for k in encoder if k.startswith("layer_")) == [
        f"layer_{i}" for i in range(LAYERS)
    ]
    tol = 1e-5 if dtype == "float32" else 1e-2
    for i in range(LAYERS):
        (weights,) = encoder[f"layer_{i}"]["attention"]["attention_weights"]
        assert weights.shape == (BATCH, HEADS, PATCHES + 1, PATCHES + 1)
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=0, atol=tol)
        assert np.std(weights) > 1e-3, f"layer {i}: uniform weights"


def test_image_size_not_a_multiple_of_the_patch():
    images = np.zeros((1, SIZE + 2, SIZE, 1), np.float32)
    with pytest.raises(ValueError, match="patch_size"):
        jax.eval_shape(_model().init, jax.random.key(0), images)


def test_max_len_shorter_than_the_tokens_raises():
    model = _model(max_len=PATCHES)  # one short: patches + CLS
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(model.init, jax.random.key(0), IMAGES)


def test_invalid_pooling_names_the_field():
    model = dataclasses.replace(_model(), pooling="max")
    with pytest.raises(ValueError, match="'pooling'"):
        jax.eval_shape(model.init, jax.random.key(0), IMAGES)


def test_non_dot_product_kernel_is_rejected():
    with pytest.raises(ValueError, match=r"options\.attention"):
        jax.eval_shape(_model("additive").init, jax.random.key(0), IMAGES)
