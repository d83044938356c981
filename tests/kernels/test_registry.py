"""The kernel registry: lookup, capabilities, third-party registration, refused arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels


@pytest.fixture
def scratch_kernel():
    """Registers a minimal third-party kernel (mask only) and removes it afterwards."""

    @kernels.register("test_mask_only", capabilities=kernels.Capabilities(mask=True))
    def mask_only(query, key, value, mask=None, *, scale=None):
        return kernels.dot_product_attention(query, key, value, mask=mask, scale=scale)

    yield mask_only
    kernels.unregister("test_mask_only")


def _qkv(heads=2, kv_heads=2):
    rng = np.random.RandomState(0)
    return (
        jnp.asarray(rng.randn(2, 5, heads, 4), jnp.float32),
        jnp.asarray(rng.randn(2, 5, kv_heads, 4), jnp.float32),
        jnp.asarray(rng.randn(2, 5, kv_heads, 4), jnp.float32),
    )


def test_builtin_kernels_are_registered_with_capabilities():
    names = kernels.available()
    for name in ("dot_product", "additive", "multiplicative", "pooling"):
        assert name in names
    assert kernels.get("dot_product") is kernels.dense_attention
    assert kernels.get("flash") is kernels.flash_attention
    caps = kernels.capabilities("dot_product")
    assert caps.exact and caps.interface == "dot_product"
    assert set(caps.supported()) >= {
        "mask",
        "bias",
        "causal",
        "window",
        "dropout",
        "gqa",
        "weights",
    }
    assert "dot_product" in kernels.available(interface="dot_product", exact=True)
    assert "additive" not in kernels.available(interface="dot_product")


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention kernel 'nope'.*dot_product"):
        kernels.get("nope")


def test_third_party_registration_and_refused_arguments(scratch_kernel):
    assert "test_mask_only" in kernels.available(interface="dot_product", exact=True)
    fn = kernels.get("test_mask_only")
    assert fn is scratch_kernel
    q, k, v = _qkv()
    mask = jnp.ones((2, 1, 5, 5), bool).at[..., 0].set(False)
    np.testing.assert_allclose(
        fn(q, k, v, mask=mask), kernels.dot_product_attention(q, k, v, mask=mask)
    )
    # Inactive arguments the kernel does not declare are accepted (they ask for nothing).
    np.testing.assert_allclose(
        fn(q, k, v, bias=None, is_causal=False, dropout_rate=0.0, return_weights=False),
        fn(q, k, v),
    )
    refused = {
        "bias": dict(bias=jnp.zeros((5, 5))),
        "is_causal": dict(is_causal=True),
        "local_window_size": dict(local_window_size=(1, 1)),
        "query_seq_lengths": dict(query_seq_lengths=jnp.array([2, 3])),
        "dropout_rate": dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
        "return_weights": dict(return_weights=True),
    }
    for arg, kwargs in refused.items():
        with pytest.raises(ValueError, match=arg):
            fn(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="grouped-query"):
        fn(*_qkv(heads=4, kv_heads=2))
    with pytest.raises(ValueError, match="has no argument 'frobnicate'"):
        fn(q, k, v, frobnicate=3)


def test_positional_unsupported_argument_is_refused():
    @kernels.register("test_declares_bias", capabilities=kernels.Capabilities())
    def declares_bias(query, key, value, bias=None):
        return kernels.dot_product_attention(query, key, value, bias)

    try:
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="bias"):
            kernels.get("test_declares_bias")(q, k, v, jnp.zeros((5, 5)))
    finally:
        kernels.unregister("test_declares_bias")


def test_duplicate_registration_needs_override(scratch_kernel):
    with pytest.raises(ValueError, match="already registered"):
        kernels.register("test_mask_only", capabilities=kernels.Capabilities())(lambda q, k, v: q)
    kernels.register("test_mask_only", capabilities=kernels.Capabilities(), override=True)(
        lambda query, key, value: query
    )
    assert kernels.capabilities("test_mask_only") == kernels.Capabilities()


def test_register_validates_its_arguments():
    with pytest.raises(ValueError, match="name"):
        kernels.register("", capabilities=kernels.Capabilities())
    with pytest.raises(ValueError, match="capabilities"):
        kernels.register("x", capabilities={"maks": True})
    with pytest.raises(ValueError, match="capabilities"):
        kernels.register("x", capabilities=3)


def test_capabilities_from_mapping_or_names():
    as_names = kernels.Capabilities.coerce({"mask", "Causal"})
    assert as_names == kernels.Capabilities(mask=True, causal=True)
    as_mapping = kernels.Capabilities.coerce({"mask": True, "exact": False})
    assert as_mapping == kernels.Capabilities(mask=True, exact=False)


def test_var_kwargs_kernel_still_refuses_unsupported_arguments():
    @kernels.register("test_var_kwargs", capabilities={"mask"})
    def var_kwargs(query, key, value, bias=None, mask=None, **options):
        assert not options, options
        return kernels.dot_product_attention(query, key, value, mask=mask)

    try:
        q, k, v = _qkv()
        fn = kernels.get("test_var_kwargs")
        for arg, value in {
            "is_causal": True,
            "local_window_size": 2,
            "return_weights": True,
            "key_value_seq_lengths": jnp.array([2, 3]),
        }.items():
            with pytest.raises(ValueError, match=arg):
                fn(q, k, v, **{arg: value})
        with pytest.raises(ValueError, match="dropout_rate"):
            fn(q, k, v, dropout_rate=np.float32(0.2), dropout_rng=jax.random.key(0))
        fn(q, k, v, is_causal=False, dropout_rate=np.float32(0.0))  # off: fine
    finally:
        kernels.unregister("test_var_kwargs")


def test_register_without_capabilities_supports_nothing_optional():
    @kernels.register("test_plain")
    def plain(query, key, value):
        return kernels.dot_product_attention(query, key, value)

    try:
        assert kernels.capabilities("test_plain") == kernels.Capabilities()
        with pytest.raises(ValueError, match="mask"):
            plain(*_qkv(), mask=jnp.ones((5, 5), bool))
    finally:
        kernels.unregister("test_plain")
