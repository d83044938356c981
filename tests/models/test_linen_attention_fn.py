"""Every registered dot_product kernel as the ``attention_fn`` of
``flax.linen.MultiHeadDotProductAttention`` with ``dtype=bfloat16`` and ``precision`` set:
forward and backward, close to flax's own attention on the same weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels

NAMES = kernels.available(interface="dot_product")
OPTIONS = {"performer": {"rng": jax.random.key(3)}}  # its random features' key


@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_runs_in_linen_attention_with_bfloat16_and_precision(name):
    caps = kernels.capabilities(name)
    make = lambda **kw: nn.MultiHeadDotProductAttention(
        num_heads=4, qkv_features=32, dtype=jnp.bfloat16,
        precision=jax.lax.Precision.HIGHEST, **kw,
    )  # fmt: skip
    ours = make(attention_fn=kernels.flax_attention_fn(name, **OPTIONS.get(name, {})))
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    mask = nn.make_causal_mask(jnp.ones((2, 8))) if caps.mask else None
    kwargs = {"mask": mask} if caps.mask else {}
    params = make().init(jax.random.key(0), x)

    def loss(params, layer):
        return jnp.sum(layer.apply(params, x, **kwargs).astype(jnp.float32) ** 2)

    out = jax.jit(lambda p: ours.apply(p, x, **kwargs))(params)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 16)
    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, ours)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in leaves)
    assert any(np.abs(np.asarray(g, np.float32)).max() > 0 for g in leaves)
    if caps.exact and caps.mask:  # flax's own attention, same weights, same mask
        expected = make().apply(params, x, **kwargs)
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=5e-2
        )
        flax_grads = jax.grad(loss, argnums=0)(params, make())
        f32 = lambda g: np.asarray(g, np.float32)
        scale = max(np.abs(f32(b)).max() for b in jax.tree.leaves(flax_grads))
        error = max(
            np.abs(f32(a) - f32(b)).max()
            for a, b in zip(leaves, jax.tree.leaves(flax_grads), strict=True)
        )
        assert error <= 0.05 * scale, (error, scale)  # bfloat16 rounding, float32 softmax
