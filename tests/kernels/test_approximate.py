"""Approximate kernels (``linear``, ``performer``): their own properties, each able to fail."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels
from attn_jax.kernels import reference as ref


def _qkv(seed=0, batch=2, q_len=12, kv_len=12, heads=4, kv_heads=2, dim=8, scale=1.0):
    rng = np.random.RandomState(seed)
    q = scale * rng.randn(batch, q_len, heads, dim)
    k = scale * rng.randn(batch, kv_len, kv_heads, dim)
    v = rng.randn(batch, kv_len, kv_heads, 5)
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _linear_float64(q, k, v, causal, kv_lengths=None):
    """Bottom-right causal when ``q_len != kv_len``: query ``i`` sees keys ``j <= i +
    kv_len - q_len``."""
    """The linear-attention formula evaluated directly (quadratic form) in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(x))  # elu(x) + 1
    groups = q.shape[-2] // k.shape[-2]
    k, v = np.repeat(k, groups, axis=-2), np.repeat(v, groups, axis=-2)
    scores = np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
    if causal:
        q_len, kv_len = scores.shape[-2:]
        scores = scores * np.tril(np.ones((q_len, kv_len)), k=kv_len - q_len)
    if kv_lengths is not None:
        scores = (
            scores
            * (np.arange(k.shape[1])[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None]
        )
    out = np.einsum("bhqk,bkhd->bqhd", scores, v)
    total = scores.sum(-1).transpose(0, 2, 1)[..., None]
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), 0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_matches_its_formula_in_float64(causal):
    q, k, v = _qkv()
    lengths = jnp.array([12, 7])
    # chunk 5 does not divide 12: exercises the chunk padding of the causal scan
    out = kernels.linear_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=lengths, chunk_size=5
    )
    np.testing.assert_allclose(
        out, _linear_float64(q, k, v, causal, kv_lengths=lengths), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_causal_outputs_ignore_the_future(name):
    q, k, v = _qkv(seed=1)
    kwargs = {"rng": jax.random.key(0)} if name == "performer" else {}
    fn = kernels.get(name)
    out = fn(q, k, v, is_causal=True, **kwargs)
    k2, v2 = k.at[:, 8:].add(3.0), v.at[:, 8:].add(3.0)
    out2 = fn(q, k2, v2, is_causal=True, **kwargs)
    np.testing.assert_allclose(out[:, :8], out2[:, :8], atol=1e-6)
    assert not np.allclose(out[:, 8:], out2[:, 8:], atol=1e-3)
    full = fn(q, k, v, is_causal=False, **kwargs)  # the last row sees every key either way
    np.testing.assert_allclose(out[:, -1], full[:, -1], atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_padding_and_gradients(name):
    q, k, v = _qkv(seed=2)
    kwargs = {"rng": jax.random.key(1)} if name == "performer" else {}
    fn = kernels.get(name)
    lengths = jnp.array([12, 5])
    out = fn(q, k, v, key_value_seq_lengths=lengths, query_seq_lengths=lengths, **kwargs)
    k2 = k.at[1, 5:].set(100.0)  # padded keys and values must not matter
    v2 = v.at[1, 5:].set(-100.0)
    out2 = fn(q, k2, v2, key_value_seq_lengths=lengths, query_seq_lengths=lengths, **kwargs)
    np.testing.assert_allclose(out, out2, atol=1e-5)
    assert np.all(np.asarray(out[1, 5:]) == 0)  # padded query rows are zeros
    grads = jax.grad(lambda q, k, v: (fn(q, k, v, is_causal=True, **kwargs) ** 2).sum(), (0, 1, 2))(
        q, k, v
    )
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_performer_approaches_softmax_attention_as_features_grow():
    # Small logits: the FAVOR+ estimator's variance grows like exp(|q + k|^2).
    q, k, v = _qkv(seed=3, q_len=16, kv_len=16, heads=2, kv_heads=2, dim=16, scale=0.35)
    exact = ref.dot_product_attention(q, k, v)

    def error(m):
        outs = [
            kernels.performer_attention(q, k, v, rng=jax.random.key(s), num_features=m)
            for s in range(4)
        ]
        return float(np.mean([np.abs(np.asarray(o, np.float64) - exact).mean() for o in outs]))

    errors = [error(m) for m in (8, 64, 512, 4096)]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < errors[1] / 4 and errors[3] < 0.02, errors


def test_performer_is_keyed_by_its_rng():
    q, k, v = _qkv(seed=4)
    a = kernels.performer_attention(q, k, v, rng=jax.random.key(0))
    b = kernels.performer_attention(q, k, v, rng=jax.random.key(0))
    c = kernels.performer_attention(q, k, v, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="'rng'"):
        kernels.performer_attention(q, k, v)


@pytest.mark.parametrize("name", ["linear", "performer"])
@pytest.mark.parametrize(
    "argument, value",
    [
        ("mask", jnp.ones((12, 12), bool)),
        ("bias", jnp.zeros((12, 12))),
        ("local_window_size", (2, 2)),
        ("dropout_rate", 0.1),
    ],
)
def test_arguments_without_a_feature_form_raise(name, argument, value):
    q, k, v = _qkv()
    kwargs = {"rng": jax.random.key(0)} if name == "performer" else {}
    with pytest.raises(ValueError, match=argument):
        kernels.get(name)(q, k, v, **{argument: value}, **kwargs)
    if argument in ("mask", "bias"):  # called directly, not through the registry
        fn = {"linear": kernels.linear_attention, "performer": kernels.performer_attention}[name]
        with pytest.raises(ValueError, match=argument):
            fn(q, k, v, **{argument: value}, **kwargs)


@pytest.mark.parametrize("q_len, kv_len", [(4, 12), (12, 5)])
def test_causal_with_unequal_lengths_is_bottom_right(q_len, kv_len):
    q, k, v = _qkv(q_len=q_len, kv_len=kv_len)
    out = kernels.linear_attention(q, k, v, is_causal=True, chunk_size=3)
    np.testing.assert_allclose(out, _linear_float64(q, k, v, True), atol=2e-5, rtol=1e-5)
    # Top-left alignment and explicit positions have no prefix-sum form here: refused.
    with pytest.raises(ValueError, match="causal_alignment"):
        kernels.linear_attention(q, k, v, is_causal=True, causal_alignment="top_left")
    with pytest.raises(ValueError, match="query_positions"):
        kernels.linear_attention(q, k, v, query_positions=jnp.zeros((2, q_len), jnp.int32))


@pytest.mark.parametrize("causal", [False, True])
def test_performer_gradients_at_a_model_head_dim_are_finite_and_right(causal):
    """At head_dim 64 FAVOR+ key features reach 1e-25; a plain num / den then squares the
    denominator into 0 in the backward pass (NaN gradients: a model could not train)."""
    q, k, v = _qkv(seed=4, q_len=32, kv_len=32, heads=1, kv_heads=1, dim=64, scale=0.5)
    fn = lambda q, k, v: kernels.performer_attention(
        q, k, v, rng=jax.random.key(5), is_causal=causal
    )
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    direction = [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate((q, k, v))]
    eps = 1e-2
    plus = loss(*(x + eps * d for x, d in zip((q, k, v), direction, strict=True)))
    minus = loss(*(x - eps * d for x, d in zip((q, k, v), direction, strict=True)))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(grads, direction, strict=True))
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_performer_projection_is_orthogonal_within_each_block():
    from attn_jax.kernels.performer import orthogonal_features

    dim, num_features = 16, 40  # blocks of 16, 16 and 8 rows
    projection = np.asarray(orthogonal_features(jax.random.key(3), num_features, dim))
    directions = projection / np.linalg.norm(projection, axis=-1, keepdims=True)
    for start in range(0, num_features, dim):
        block = directions[start : start + dim]
        np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-5)
    # Row norms are chi(dim) draws (mean ~ sqrt(dim)), not all equal to one.
    norms = np.linalg.norm(projection, axis=-1)
    assert 0.7 * np.sqrt(dim) < norms.mean() < 1.3 * np.sqrt(dim) and norms.std() > 0.1


def test_performer_compiles_without_lapack_custom_calls():
    """A LAPACK QR custom call in a jitted model wedged XLA's CPU thread pool (the program
    never returned); the projection is built from plain matmuls instead."""
    q, k, v = _qkv(dim=16)
    fn = lambda q, k, v: kernels.performer_attention(q, k, v, rng=jax.random.key(0))
    hlo = jax.jit(fn).lower(q, k, v).as_text()
    assert "custom_call" not in hlo


@pytest.mark.parametrize("causal", [False, True])
def test_performer_estimates_softmax_at_wide_heads(causal):
    """Keys once shifted by ``|w|^2 / 2`` (about head_dim / 2) underflowed to 0 from
    head_dim ~200 on: every output 0, and a width-256 one-head model never learned."""
    rng = np.random.RandomState(0)
    q, k = (jnp.asarray(0.125 * rng.randn(2, 16, 2, 256), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.randn(2, 16, 2, 5), jnp.float32)
    exact = ref.dot_product_attention(q, k, v, is_causal=causal)
    out = kernels.performer_attention(
        q, k, v, rng=jax.random.key(0), num_features=1024, is_causal=causal
    )
    error = np.abs(np.asarray(out, np.float64) - exact).max()
    assert error < 0.05 * np.abs(exact).max(), error


def test_performer_keys_near_a_projection_row_stay_finite_and_decode_alike():
    """A key at ``x = w_m`` has log-feature ``|w_m|^2 / 2`` (about 128 at head_dim 256):
    every key of the sequence is shifted alike by the largest (exact, finite), and
    decoding rescales its sums when a later key needs a larger shift."""
    from attn_jax.kernels.performer import PERFORMER_RECURRENCE, orthogonal_features

    q, k, v = _qkv(seed=6, q_len=8, kv_len=8, heads=2, kv_heads=1, dim=256, scale=0.125)
    projection = orthogonal_features(jax.random.key(0), 64, 256)
    options = {"projection": projection, "rng": None}
    k = k.at[:, 5, 0].set(4.0 * projection[0])  # scaled by 256 ** -0.25: exactly w_0
    # Chunks of 1: each row's keys shifted by the largest so far (within a chunk, the
    # chunk's largest: rows before such a key would underflow).
    out = kernels.performer_attention(q, k, v, projection=projection, is_causal=True, chunk_size=1)
    assert np.all(np.isfinite(out)) and np.all(np.any(out != 0, axis=-1))
    state = PERFORMER_RECURRENCE.init(2, 1, 256, 5, options)
    rows = []
    for t in range(8):  # one token at a time
        step = (q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        row, state = PERFORMER_RECURRENCE.step(state, *step, options=options)
        rows.append(row)
        shift = float(state["shift"].min())
        assert shift < 10 if t < 5 else shift > 60, (t, shift)
    np.testing.assert_allclose(jnp.concatenate(rows, axis=1), out, rtol=1e-4, atol=1e-5)
