"""Every registered dot_product kernel as ``flax.nnx.MultiHeadAttention(attention_fn=...)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import kernels

NAMES = kernels.available(interface="dot_product")
OPTIONS = {"performer": {"rng": jax.random.key(3)}}  # its random features' key


def _layers(attention_fn, num_kv_heads=None):
    """flax's own layer and one with ``attention_fn``, on the same weights."""
    make = lambda **kw: nnx.MultiHeadAttention(
        num_heads=4, in_features=16, qkv_features=32, num_kv_heads=num_kv_heads, decode=False,
        rngs=nnx.Rngs(0), **kw,
    )  # fmt: skip
    return make(), make(attention_fn=attention_fn)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_every_kernel_runs_in_nnx_multi_head_attention(name, num_kv_heads):
    caps = kernels.capabilities(name)
    flax_layer, ours = _layers(kernels.flax_attention_fn(name, **OPTIONS.get(name, {})),
                               num_kv_heads)  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    padding = jnp.arange(8)[None, :] < jnp.array([8, 5])[:, None]
    mask = nnx.make_attention_mask(padding, padding)  # [batch, 1, q, kv] floats

    calls = [{"is_causal": True}]
    if num_kv_heads is None:  # GQA: the causal call and the gradient
        calls.append({})
        if caps.mask:
            calls.append({"mask": mask})
    for call in calls:
        out = nnx.jit(lambda layer, x, call=call: layer(x, **call))(ours, x)
        assert out.shape == (2, 8, 16)
        if caps.exact:  # flax's own attention on the same weights
            expected = nnx.jit(lambda layer, x, call=call: layer(x, **call))(flax_layer, x)
            valid = padding[:, :, None] if "mask" in call else True
            np.testing.assert_allclose(
                jnp.where(valid, out, 0), jnp.where(valid, expected, 0), atol=2e-5,
                err_msg=f"{name} {call.keys()}",
            )  # fmt: skip
        else:
            assert bool(jnp.all(jnp.isfinite(out)))

    grads = nnx.jit(nnx.grad(lambda layer: jnp.mean(layer(x, is_causal=True) ** 2)))(ours)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    if not caps.mask:  # refused, naming the argument, not ignored
        with pytest.raises(kernels.UnsupportedArgumentError, match="mask"):
            ours(x, mask=mask)
