"""Where attn_jax's front end meets jax.nn's behaviour, and where it deliberately does not:
the log-sum-exp residual (ours: float32 with its true gradient; ``"jax.nn"``: jax.nn's)
and complex inputs (refused, as README says)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels

RESIDUAL = [
    n for n in kernels.available(interface="dot_product") if kernels.capabilities(n).residual
]


def _qkv(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 8, 4, 16), dtype)
    k = jax.random.normal(keys[1], (2, 8, 2, 16), dtype)
    v = jax.random.normal(keys[2], (2, 8, 2, 16), dtype)
    return q, k, v


@pytest.mark.parametrize("name", RESIDUAL)
def test_residual_modes_ours_has_its_gradient_jax_nn_mode_is_jax_nns(name):
    kernel = kernels.get(name)
    q, k, v = _qkv(jnp.bfloat16)
    _, expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    _, like_jax = kernel(q, k, v, is_causal=True, return_residual="jax.nn")
    assert like_jax.dtype == expected.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(like_jax, np.float32), np.asarray(expected, np.float32), atol=2e-2
    )
    _, ours = kernel(q, k, v, is_causal=True, return_residual=True)
    assert ours.dtype == jnp.float32

    q, k, v = _qkv(jnp.float32)

    def residual_sum(q, mode):
        return kernel(q, k, v, is_causal=True, return_residual=mode)[1].astype(jnp.float32).sum()

    assert float(jnp.abs(jax.grad(residual_sum)(q, True)).max()) > 0  # the true gradient
    assert float(jnp.abs(jax.grad(residual_sum)(q, "jax.nn")).max()) == 0  # stopped


def test_residual_rejects_other_values_naming_the_argument():
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match="return_residual"):
        kernels.dot_product_attention(q, k, v, return_residual="yes")


def test_complex_inputs_are_refused_naming_the_argument():
    q, k, v = (x.astype(jnp.complex64) for x in _qkv(jnp.float32))
    with pytest.raises(ValueError, match=r"'query'.*floating-point.*complex64"):
        kernels.dot_product_attention(q, k, v)
    assert jax.nn.dot_product_attention(q, k, v).dtype == jnp.complex64  # jax.nn takes them
