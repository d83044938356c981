"""The MultiHeadAttention layer and position encodings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels, models


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_self_and_cross_attention_shapes_and_gqa_parameters():
    layer = models.MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, out_features=12)
    x, memory = _x((2, 5, 16)), _x((2, 7, 10), seed=1)
    params = layer.init(jax.random.key(0), x, memory)["params"]
    assert params["query"]["kernel"].shape == (16, 4, 8)
    assert params["key"]["kernel"].shape == (10, 2, 8)
    assert params["value"]["kernel"].shape == (10, 2, 8)
    assert layer.apply({"params": params}, x, memory).shape == (2, 5, 12)
    self_params = layer.init(jax.random.key(0), x)["params"]
    assert layer.apply({"params": self_params}, x).shape == (2, 5, 12)


def test_matches_hand_written_attention():
    layer = models.MultiHeadAttention(num_heads=2, is_causal=True)
    x = _x((1, 4, 6))
    params = layer.init(jax.random.key(0), x)["params"]
    q = jnp.einsum("bld,dhk->blhk", x, params["query"]["kernel"])
    k = jnp.einsum("bld,dhk->blhk", x, params["key"]["kernel"])
    v = jnp.einsum("bld,dhk->blhk", x, params["value"]["kernel"])
    expected = jnp.einsum(
        "blhk,hkd->bld",
        jax.nn.dot_product_attention(q, k, v, is_causal=True),
        params["out"]["kernel"],
    )
    np.testing.assert_allclose(layer.apply({"params": params}, x), expected, atol=1e-5)


def test_sowed_weights_and_padding_mask():
    layer = models.MultiHeadAttention(num_heads=2)
    x = _x((2, 5, 8))
    mask = (jnp.arange(5) < jnp.array([[3], [5]]))[:, None, None, :]
    params = layer.init(jax.random.key(0), x)["params"]
    _, state = layer.apply(
        {"params": params}, x, mask=mask, sow_weights=True, mutable=["intermediates"]
    )
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.asarray(weights)[0, :, :, 3:] == 0)


def test_bad_configurations_raise_clear_errors():
    x = _x((2, 5, 8))
    with pytest.raises(ValueError, match="'attention'"):
        models.MultiHeadAttention(num_heads=2, attention="additive").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_kv_heads"):
        models.MultiHeadAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="inputs_kv=None with cross_attention=True"):
        models.MultiHeadAttention(num_heads=2, cross_attention=True).init(jax.random.key(0), x)

    @kernels.register("test_no_weights", capabilities={"mask"})
    def no_weights(query, key, value, bias=None, mask=None):
        return kernels.dot_product_attention(query, key, value, mask=mask)

    try:
        layer = models.MultiHeadAttention(num_heads=2, attention="test_no_weights")
        params = layer.init(jax.random.key(0), x)["params"]
        with pytest.raises(ValueError, match="sow_weights"):
            layer.apply({"params": params}, x, sow_weights=True, mutable=["intermediates"])
    finally:
        kernels.unregister("test_no_weights")


def test_compute_and_parameter_dtypes():
    layer = models.MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = _x((2, 5, 8))
    variables = layer.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_position():
    q, k = _x((1, 1, 1, 8)), _x((1, 1, 1, 8), seed=1)

    def score(i, j):
        rq = models.apply_rope(q, jnp.array([[i]]))
        rk = models.apply_rope(k, jnp.array([[j]]))
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    np.testing.assert_allclose(  # a rotation: norms are kept
        jnp.linalg.norm(models.apply_rope(q, jnp.array([[7]]))), jnp.linalg.norm(q), rtol=1e-6
    )
    with pytest.raises(ValueError, match="even head_dim"):
        models.apply_rope(_x((1, 2, 1, 5)), jnp.arange(2))


def test_sinusoidal_and_learned_positions():
    table = models.sinusoidal_positions(jnp.arange(6), 7)
    assert table.shape == (6, 7)
    np.testing.assert_allclose(table[0, :3], 0.0)  # sin(0)
    np.testing.assert_allclose(table[0, 3:6], 1.0)  # cos(0)
    learned = models.LearnedPositions(max_len=10, features=4)
    params = learned.init(jax.random.key(0), jnp.arange(3))
    out = learned.apply(params, jnp.array([[0, 2]]))
    np.testing.assert_array_equal(out[0, 1], params["params"]["embedding"][2])


def test_random_features_come_from_the_params_rng_and_then_stay_fixed():
    import optax
    from ml_collections import ConfigDict

    from attn_jax.train.optim import make_optimizer

    layer = models.MultiHeadAttention(
        num_heads=2, attention="performer", attention_kwargs={"num_features": 16}
    )
    x = _x((2, 5, 8))
    init = jax.jit(lambda key: layer.init(key, x)["params"])
    params, other = init(jax.random.key(0)), init(jax.random.key(1))
    assert params["random_features"].shape == (16, 4)
    assert not np.allclose(params["random_features"], other["random_features"])  # the seed
    apply = jax.jit(lambda p: layer.apply({"params": p}, x))
    np.testing.assert_array_equal(apply(params), apply(params))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(params)
    assert not np.any(grads["random_features"]) and np.any(grads["query"]["kernel"])
    optim = ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, weight_decay=0.5, grad_clip=1.0))
    tx = make_optimizer(optim, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    stepped = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(stepped["random_features"], params["random_features"])
    assert not np.allclose(stepped["query"]["kernel"], params["query"]["kernel"])


@pytest.mark.parametrize("attention", ["dot_product", "sliding_window"])
def test_decoding_caches_padding_as_zeros_and_nan_there_never_leaks(attention):
    """A ragged prompt whose padding holds NaN: the cache keeps zeros in those slots (the
    kernels are told that what no query sees is finite), and every later output is the
    one of a prompt padded with zeros."""
    window = {"local_window_size": (3, 0)} if attention == "sliding_window" else {}
    layer = models.MultiHeadAttention(
        num_heads=2, is_causal=True, attention=attention, attention_kwargs=window
    )
    prompt, lengths = _x((2, 4, 8)), jnp.array([4, 2])
    padding = jnp.arange(4)[None, :, None] >= lengths[:, None, None]
    params = layer.init(jax.random.key(0), prompt)["params"]
    cache = layer.init(jax.random.key(0), _x((2, 8, 8)), decode=True)["cache"]

    def run(prompt):
        step = lambda c, x, n=None: layer.apply(
            {"params": params, "cache": c}, x, lengths=n, decode=True, mutable=["cache"]
        )
        out, state = step(cache, prompt, lengths)
        outs = [out]
        for t in range(3):
            out, state = step(state["cache"], _x((2, 1, 8), seed=10 + t))
            outs.append(out)
        return jnp.concatenate(outs, 1), state["cache"]

    out_nan, cache_nan = run(jnp.where(padding, jnp.nan, prompt))
    out_zero, _ = run(jnp.where(padding, 0.0, prompt))
    real = np.asarray(jnp.concatenate([~padding[..., 0], jnp.ones((2, 3), bool)], 1))
    assert np.all(np.isfinite(np.asarray(out_nan)[real]))
    np.testing.assert_allclose(np.asarray(out_nan)[real], np.asarray(out_zero)[real], atol=1e-6)
    for name in ("cached_key", "cached_value"):
        assert np.all(np.isfinite(np.asarray(cache_nan[name])))
