"""Drop-in parity with jax.nn.dot_product_attention and flax.linen attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels


def _qkv(batch=(2,), q_len=6, kv_len=6, heads=4, kv_heads=4, dim=8, dtype=jnp.float32, seed=0):
    rng = np.random.RandomState(seed)
    make = lambda *s: jnp.asarray(rng.randn(*s), dtype)
    return (
        make(*batch, q_len, heads, dim),
        make(*batch, kv_len, kv_heads, dim),
        make(*batch, kv_len, kv_heads, dim),
    )


RNG = np.random.RandomState(1)
# Every call shape jax.nn.dot_product_attention accepts that we share (positional bias and
# mask, keyword options). Causal and window masks are compared at q_len == kv_len, where
# jax.nn's top-left alignment and our bottom-right alignment coincide.
JAX_NN_CALLS = {
    "plain": ((), {}),
    "scale": ((), {"scale": 0.3}),
    "bias_positional": ((jnp.asarray(RNG.randn(2, 4, 6, 6), jnp.float32),), {}),
    "mask_positional": ((None, jnp.asarray(RNG.rand(2, 1, 6, 6) < 0.7)), {}),
    "bias_and_mask": (
        (jnp.asarray(RNG.randn(1, 4, 6, 6), jnp.float32), jnp.asarray(RNG.rand(2, 4, 1, 6) < 0.7)),
        {},
    ),
    "causal": ((), {"is_causal": True}),
    "window_tuple": ((), {"local_window_size": (2, 1)}),
    "window_int": ((), {"local_window_size": 1}),
    "causal_window": ((), {"is_causal": True, "local_window_size": (2, 0)}),
    "seq_lengths": (
        (),
        {
            "query_seq_lengths": jnp.array([3, 6], jnp.int32),
            "key_value_seq_lengths": jnp.array([2, 5], jnp.int32),
        },
    ),
}


@pytest.mark.parametrize("call", JAX_NN_CALLS, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_jax_nn(call, heads, kv_heads):
    args, kwargs = JAX_NN_CALLS[call]
    q, k, v = _qkv(heads=heads, kv_heads=kv_heads)
    ours = kernels.dot_product_attention(q, k, v, *args, **kwargs)
    theirs = jax.nn.dot_product_attention(q, k, v, *args, **kwargs)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_matches_jax_nn_without_batch_dims_and_in_bfloat16():
    q, k, v = _qkv(batch=(), dtype=jnp.bfloat16)
    ours = kernels.dot_product_attention(q, k, v, is_causal=True)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == theirs.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=2e-2)


def test_residual_matches_jax_nn():
    q, k, v = _qkv()
    out, lse = kernels.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    ref_out, ref_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    assert lse.shape == ref_lse.shape == (2, 6, 4)
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5)


def test_gradients_match_jax_nn():
    q, k, v = _qkv(heads=4, kv_heads=2)
    bias = jnp.asarray(RNG.randn(2, 4, 6, 6), jnp.float32)

    def loss(fn):
        return lambda q, k, v, b: jnp.sum(jnp.sin(fn(q, k, v, b, is_causal=True)))

    ours = jax.grad(loss(kernels.dot_product_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    theirs = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_flax_dot_product_attention(masked, with_bias):
    q, k, v = _qkv(batch=(2, 3), q_len=5, kv_len=7)
    mask = jnp.asarray(RNG.rand(2, 3, 1, 5, 7) < 0.6) if masked else None
    bias = jnp.asarray(RNG.randn(2, 3, 4, 5, 7), jnp.float32) if with_bias else None
    ours = kernels.dot_product_attention(q, k, v, bias, mask)
    theirs = nn.dot_product_attention(q, k, v, bias, mask)
    if masked:  # flax averages the values on rows without a visible key; we return zeros.
        visible = np.asarray(mask).any(-1)  # [2, 3, 1, 5]
        rows = np.moveaxis(np.broadcast_to(visible, (2, 3, 4, 5)), -1, -2)
        np.testing.assert_allclose(np.asarray(ours)[rows], np.asarray(theirs)[rows], atol=2e-6)
        assert np.all(np.asarray(ours)[~rows] == 0)
    else:
        np.testing.assert_allclose(ours, theirs, atol=2e-6)


def _mhdpa(attention_fn=None, dropout_rate=0.0):
    kwargs = {} if attention_fn is None else {"attention_fn": attention_fn}
    return nn.MultiHeadDotProductAttention(
        num_heads=4, qkv_features=16, dropout_rate=dropout_rate, **kwargs
    )


def test_flax_module_with_our_attention_fn():
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(2, 6, 12), jnp.float32)
    tokens = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = nn.combine_masks(nn.make_attention_mask(tokens, tokens), nn.make_causal_mask(tokens))
    assert mask.dtype == jnp.float32  # flax's own masks are float; the adapter converts.
    params = _mhdpa().init(jax.random.key(0), x, mask=mask)
    theirs = _mhdpa().apply(params, x, mask=mask)
    ours_module = _mhdpa(kernels.flax_attention_fn("dot_product"))
    ours = ours_module.apply(params, x, mask=mask)
    # Padded query rows see no key: flax averages the values there, we return zeros.
    valid = np.asarray(tokens, bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], atol=2e-6)
    assert np.all(np.asarray(ours)[~valid] == 0)

    # Sowed weights match flax's, with the same collection and name.
    _, ours_state = ours_module.apply(
        params, x, mask=mask, sow_weights=True, mutable="intermediates"
    )
    _, theirs_state = _mhdpa().apply(
        params, x, mask=mask, sow_weights=True, mutable="intermediates"
    )
    (ours_w,) = jax.tree.leaves(ours_state)
    (theirs_w,) = jax.tree.leaves(theirs_state)
    assert ours_w.shape == (2, 4, 6, 6)
    rows = lambda w: np.moveaxis(np.asarray(w), 2, 1)[valid]  # valid query rows
    np.testing.assert_allclose(rows(ours_w), rows(theirs_w), atol=2e-6)

    # Dropout: off when deterministic, keyed and reproducible otherwise.
    drop = _mhdpa(kernels.flax_attention_fn("dot_product"), dropout_rate=0.5)
    np.testing.assert_array_equal(drop.apply(params, x, mask=mask, deterministic=True), ours)
    key = {"dropout": jax.random.key(3)}
    a = drop.apply(params, x, mask=mask, deterministic=False, rngs=key)
    b = drop.apply(params, x, mask=mask, deterministic=False, rngs=key)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, ours)


def test_flax_adapter_refuses_unsupported_options():
    fn = kernels.flax_attention_fn("dot_product")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="qk_attn_weights_einsum"):
        fn(q, k, v, qk_attn_weights_einsum=jnp.einsum)


def test_kernel_plugs_into_flax_directly_with_boolean_masks():
    """``dot_product_attention`` itself is a valid ``attention_fn`` (deterministic, module)."""
    x = jnp.asarray(np.random.RandomState(3).randn(2, 6, 12), jnp.float32)
    mask = nn.make_causal_mask(jnp.ones((2, 6)), dtype=bool)
    params = _mhdpa().init(jax.random.key(0), x, mask=mask)
    theirs, theirs_state = _mhdpa(dropout_rate=0.3).apply(
        params, x, mask=mask, deterministic=True, sow_weights=True, mutable="intermediates"
    )
    ours_module = _mhdpa(kernels.dot_product_attention, dropout_rate=0.3)
    ours, ours_state = ours_module.apply(
        params, x, mask=mask, deterministic=True, sow_weights=True, mutable="intermediates"
    )
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    np.testing.assert_allclose(
        jax.tree.leaves(ours_state)[0], jax.tree.leaves(theirs_state)[0], atol=2e-6
    )
    noisy = ours_module.apply(
        params, x, mask=mask, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(noisy, ours)
    float_mask = nn.make_causal_mask(jnp.ones((2, 6)))
    with pytest.raises(ValueError, match="mask"):
        ours_module.apply(params, x, mask=float_mask, deterministic=True)


def test_jax_nn_implementation_argument():
    q, k, v = _qkv()
    np.testing.assert_array_equal(
        kernels.dot_product_attention(q, k, v, implementation="xla"),
        kernels.dot_product_attention(q, k, v),
    )
    with pytest.raises(ValueError, match="implementation"):
        kernels.dot_product_attention(q, k, v, implementation="cudnn")


def test_mixed_input_dtypes_need_an_explicit_dtype():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'key'"):
        kernels.dot_product_attention(q.astype(jnp.bfloat16), k, v)
    out = kernels.dot_product_attention(q.astype(jnp.bfloat16), k, v, dtype=jnp.float32)
    assert out.dtype == jnp.float32


def test_numpy_scalar_dropout_rate_and_bad_window():
    q, k, v = _qkv()
    a = kernels.dot_product_attention(
        q, k, v, dropout_rate=np.float32(0.2), dropout_rng=jax.random.key(1)
    )
    b = kernels.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="local_window_size"):
        kernels.dot_product_attention(q, k, v, local_window_size=True)


def test_flax_decode_with_adapter_matches_flax():
    x = jnp.asarray(np.random.RandomState(4).randn(2, 5, 16), jnp.float32)
    make = lambda fn=None: nn.MultiHeadDotProductAttention(
        num_heads=4, decode=True, **({} if fn is None else {"attention_fn": fn})
    )
    variables = make().init(jax.random.key(0), x)
    params, cache = variables["params"], variables["cache"]
    outputs = {}
    for label, module in (("flax", make()), ("ours", make(kernels.flax_attention_fn()))):
        state, steps = cache, []
        for t in range(5):
            y, updated = module.apply(
                {"params": params, "cache": state}, x[:, t : t + 1], mutable=["cache"]
            )
            state = updated["cache"]
            steps.append(y)
        outputs[label] = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(outputs["ours"], outputs["flax"], atol=2e-6)
