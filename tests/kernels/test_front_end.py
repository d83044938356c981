"""The front end: ``implementation=`` (a name, a list tried in order, ``None`` dispatching),
arguments checked once, the alignment option, and flax NNX's ``attention_fn``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import kernels
from attn_jax.kernels import api


def _qkv(q_len=6, kv_len=6, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.RandomState(seed)
    make = lambda *s: jnp.asarray(rng.randn(*s), jnp.float32)
    return (
        make(2, q_len, heads, dim),
        make(2, kv_len, kv_heads, dim),
        make(2, kv_len, kv_heads, dim),
    )


@pytest.fixture
def recorded():
    """A plain third-party kernel that records its calls, and one core kernel that takes no
    mask (so a list of both falls through to the first)."""
    calls = []

    @kernels.register("test_recording", capabilities={"mask", "gqa"})
    def recording(query, key, value, bias=None, mask=None):
        calls.append("test_recording")
        return kernels.dot_product_attention(query, key, value, mask=mask)

    @kernels.register("test_maskless_core", capabilities={"gqa"})
    def maskless(call):
        calls.append("test_maskless_core")
        return kernels.get("dot_product")(call.query, call.key, call.value)  # a bare array

    yield calls
    kernels.unregister("test_recording")
    kernels.unregister("test_maskless_core")


def test_a_name_selects_the_kernel_and_takes_its_options():
    q, k, v = _qkv()
    np.testing.assert_allclose(
        kernels.dot_product_attention(q, k, v, is_causal=True, implementation="flash", block_q=2),
        kernels.flash_attention(q, k, v, is_causal=True, block_q=2),
    )
    np.testing.assert_array_equal(
        kernels.dot_product_attention(q, k, v, implementation="xla"),  # jax.nn's name
        kernels.get("dot_product")(q, k, v),
    )
    with pytest.raises(ValueError, match="has no argument 'block_x'"):
        kernels.dot_product_attention(q, k, v, implementation="flash", block_x=2)
    with pytest.raises(ValueError, match=r"'block_q'.*one named implementation"):
        kernels.dot_product_attention(q, k, v, block_q=2)
    with pytest.raises(ValueError, match=r"'implementation'.*unknown attention kernel 'nope'"):
        kernels.dot_product_attention(q, k, v, implementation="nope")
    with pytest.raises(ValueError, match=r"'implementation'.*'additive'"):
        kernels.dot_product_attention(q, k, v, implementation="additive")


def test_a_list_falls_through_on_what_a_kernel_cannot_honour(recorded):
    q, k, v = _qkv()
    mask = jnp.asarray(np.random.RandomState(1).rand(2, 1, 6, 6) < 0.7)
    order = ["test_maskless_core", "test_recording"]
    out = kernels.dot_product_attention(q, k, v, mask=mask, implementation=order)
    assert recorded == ["test_recording"]  # the core kernel refused the mask: never called
    np.testing.assert_allclose(out, kernels.dot_product_attention(q, k, v, mask=mask), atol=1e-6)
    recorded.clear()
    kernels.dot_product_attention(q, k, v, implementation=order)
    assert recorded == ["test_maskless_core"]
    with pytest.raises(kernels.UnsupportedArgumentError, match=r"no kernel of.*'is_causal'"):
        kernels.dot_product_attention(q, k, v, is_causal=True, implementation=order)
    with pytest.raises(kernels.UnsupportedArgumentError, match="argument 'mask'"):
        kernels.dot_product_attention(q, k, v, mask=mask, implementation="test_maskless_core")


def test_none_dispatches_to_the_fastest_kernel_that_supports_the_call():
    small, long = _qkv(), _qkv(q_len=1024, kv_len=1024, heads=1, kv_heads=1, dim=4)
    assert api.dispatch(api.bind(*small), backend="cpu") == "dot_product"
    assert api.dispatch(api.bind(*long, is_causal=True), backend="cpu") == "flash"
    # Only the dense kernel returns weights; flash fuses dropout.
    assert api.dispatch(api.bind(*long, return_weights=True), backend="cpu") == "dot_product"
    rng = jax.random.key(0)
    call = api.bind(*long, dropout_rate=0.1, dropout_rng=rng)
    assert api.dispatch(call, backend="cpu") == "flash"
    assert api.dispatch(api.bind(*long), backend="tpu") == "dot_product"  # not measured yet
    q, k, v = long
    np.testing.assert_allclose(
        kernels.dot_product_attention(q, k, v, is_causal=True),
        kernels.get("dot_product")(q, k, v, is_causal=True),
        atol=2e-6,
    )


def test_top_left_alignment_matches_jax_nn_with_one_argument():
    for q_len, kv_len in ((3, 7), (7, 3)):
        q, k, v = _qkv(q_len=q_len, kv_len=kv_len, heads=2, kv_heads=2)
        theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        for name in ("dot_product", "flash", "chunked", "sliding_window", "pallas_flash"):
            ours = kernels.get(name)(q, k, v, is_causal=True, causal_alignment="top_left")
            np.testing.assert_allclose(ours, theirs, atol=2e-6, err_msg=name)
        bottom_right = kernels.dot_product_attention(q, k, v, is_causal=True)
        assert not np.allclose(bottom_right, theirs, atol=1e-3)


@pytest.mark.parametrize("name", ["dot_product", "flash", "sliding_window", "linear"])
def test_flax_attention_fn_in_nnx_multi_head_attention(name):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    make = lambda fn=None: nnx.MultiHeadAttention(
        num_heads=4,
        in_features=16,
        decode=False,
        rngs=nnx.Rngs(0),
        **({} if fn is None else {"attention_fn": fn}),
    )
    theirs, ours = make(), make(kernels.flax_attention_fn(name))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    if kernels.capabilities(name).mask:
        np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), atol=2e-6)
    # Causal through is_causal (what NNX passes), also for kernels that take no mask.
    causal = make(kernels.flax_attention_fn(name, is_causal=True))(x)
    if kernels.capabilities(name).exact:
        np.testing.assert_allclose(causal, theirs(x, mask=mask), atol=2e-6)
    assert causal.shape == (2, 5, 16) and np.all(np.isfinite(causal))


def _key_sized_selects(fn, *args) -> int:
    """How many ``select_n`` in ``fn``'s jaxpr (nested ones too) make arrays of the key's
    shape."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            made = eqn.outvars[0].aval.shape if eqn.outvars else None
            total += eqn.primitive.name == "select_n" and made == args[1].shape
            for param in eqn.params.values():
                for inner in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        total += count(inner)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("name", ["dot_product", "flash"])
def test_finite_kv_padding_skips_zeroing_keys_and_values(name, recorded):
    q, k, v = _qkv(q_len=1, kv_len=16)
    lengths = jnp.array([5, 9])
    attend = lambda hint: (
        lambda q, k, v: kernels.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, implementation=name, finite_kv_padding=hint
        )
    )
    assert _key_sized_selects(attend(False), q, k, v) == 2
    assert _key_sized_selects(attend(True), q, k, v) == 0
    # A plain kernel is not handed the hint (it has no such argument).
    out = kernels.dot_product_attention(
        q, k, v, implementation="test_recording", finite_kv_padding=True
    )
    assert recorded == ["test_recording"] and out.shape == q.shape


def test_finite_kv_padding_must_be_a_bool():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"'finite_kv_padding'.*True or False"):
        kernels.dot_product_attention(q, k, v, finite_kv_padding="yes")


def test_eager_calls_run_as_one_cached_compiled_call():
    from attn_jax.kernels import eager

    q = jnp.asarray(np.random.RandomState(0).randn(1, 6, 2, 8), jnp.float32)
    before = eager._jitted._cache_size()
    first = kernels.flash_attention(q, q, q, is_causal=True, block_q=4, block_k=4)
    again = kernels.flash_attention(q * 1.0, q, q, is_causal=True, block_q=4, block_k=4)
    assert eager._jitted._cache_size() == before + 1  # one program, reused
    traced = jax.jit(lambda x: kernels.flash_attention(x, x, x, is_causal=True, block_q=4,
                                                       block_k=4))(q)  # fmt: skip
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, traced, atol=1e-6)
    # Callables, arrays where concrete numbers are checked, and flax modules run as given.
    kernels.flash_attention(q, q, q, score_fn=lambda s, b, h, i, j: s - (i - j) * 0.1)
    kernels.dot_product_attention(q, q, q, scale=jnp.float32(0.5))
    assert eager._jitted._cache_size() == before + 1
    kernels.dot_product_attention(q, q, q, local_window_size=1)
    with pytest.raises(ValueError, match="local_window_size"):  # True is not 1
        kernels.dot_product_attention(q, q, q, local_window_size=True)
