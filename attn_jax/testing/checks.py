"""The conformance checks of one kernel on one case: values and gradients against the
float64 reference, returned weights, refusing what it does not support, NaN / inf in
padding, ``finite_kv_padding``. Each raises ``AssertionError`` (with the error it found)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.kernels import reference as ref
from attn_jax.testing.cases import TOLERANCES, Case, make_inputs, output_shape, visible_rows

# Largest error seen per dtype in this process: {dtype name: {"forward": x, "grad": y}}.
MAX_ERRORS: dict[str, dict[str, float]] = {}


def record_error(dtype: Any, kind: str, err: float) -> None:
    entry = MAX_ERRORS.setdefault(jnp.dtype(dtype).name, {"forward": 0.0, "grad": 0.0})
    entry[kind] = max(entry[kind], err)


def max_error(actual: Any, expected: np.ndarray) -> float:
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != reference {expected.shape}"
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.max(np.abs(actual - expected), initial=0.0))


def value_and_grads(
    kernel: Callable[..., Any], args: tuple, kwargs: dict[str, Any], cotangent: Any
):
    """Jitted ``(output, vjp(cotangent))`` of ``kernel(*args, **kwargs)``: one compilation.

    Array keyword arguments (masks, lengths) are traced; the others are static.
    """
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}

    @jax.jit
    def run(args, arrays, cotangent):
        out, vjp = jax.vjp(lambda *a: kernel(*a, **arrays, **static), *args)
        return out, vjp(cotangent)

    return run(args, arrays, cotangent)


def check_against_reference(
    kernel: Callable[..., Any], case: Case, dtype: Any, *, record: bool = True
) -> None:
    """Values and gradients (query, key, value, bias) vs the float64 reference.

    ``record`` adds the errors to :data:`MAX_ERRORS` (off for deliberately buggy kernels).
    """
    (q, k, v, bias), kwargs = make_inputs(case, dtype)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    cotangent = jnp.asarray(np.random.RandomState(1).randn(*output_shape(case)), dtype)
    out, grads = value_and_grads(kernel, (q, k, v, bias), kwargs, cotangent)
    assert out.dtype == q.dtype, f"output dtype {out.dtype} != query dtype {q.dtype}"
    expected, expected_grads = ref.dot_product_attention(q, k, v, bias, d_out=cotangent, **kwargs)
    err = max_error(out, expected)
    if record:
        record_error(dtype, "forward", err)
    assert err <= fwd_tol, f"{case.name}: forward error {err:.3g} > {fwd_tol}"
    # Rows that see no key are exactly zero.
    empty = ~visible_rows(case, kwargs)  # [batch..., heads, q_len]
    rows = np.moveaxis(empty, -1, -2)  # [batch..., q_len, heads]
    assert np.all(np.asarray(out, np.float64)[rows] == 0.0), "fully-masked rows not zero"
    for name, g in zip(("query", "key", "value", "bias"), grads, strict=True):
        if expected_grads.get(name) is None:
            continue
        assert g.dtype == dtype, f"gradient of {name} has dtype {g.dtype}, expected {dtype}"
        err = max_error(g, expected_grads[name])
        if record:
            record_error(dtype, "grad", err)
        assert err <= grad_tol, f"{case.name}: gradient of {name} error {err:.3g} > {grad_tol}"


def check_weights(kernel: Callable[..., Any], case: Case) -> None:
    """``return_weights=True``: shape ``[batch..., heads, q, kv]``, values, rows sum to 1/0."""
    (q, k, v, bias), kwargs = make_inputs(case, jnp.float32)
    out, weights = jax.jit(lambda *a: kernel(*a, return_weights=True, **kwargs))(q, k, v, bias)
    _, expected = ref.dot_product_attention(q, k, v, bias, return_weights=True, **kwargs)
    assert weights.shape == (*case.batch, case.heads, case.q_len, case.kv_len)
    np.testing.assert_allclose(np.asarray(weights), expected, atol=1e-5)
    sums = np.asarray(weights).sum(-1)
    np.testing.assert_allclose(sums, visible_rows(case, kwargs).astype(float), atol=1e-5)
    plain = jax.jit(lambda *a: kernel(*a, **kwargs))(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-6)


def check_unsupported_raises(kernel: Callable[..., Any], case: Case) -> None:
    """A kernel without a capability must refuse the argument, never drop it."""
    (q, k, v, bias), kwargs = make_inputs(case, jnp.float32)
    try:
        kernel(q, k, v, bias, **kwargs)
    except ValueError:
        return
    raise AssertionError(f"{case.name}: accepted arguments it does not support (no ValueError)")


def _unreachable(case: Case, kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(queries [batch..., q_len, heads], keys [batch..., kv_len, kv_heads])``: tokens
    that see nothing / that no query of any head sharing them sees."""
    allowed = ref.full_mask(case.batch, case.heads, case.q_len, case.kv_len, **kwargs)
    rows = np.moveaxis(~allowed.any(-1), -1, -2)
    cols = ~allowed.any(-2)  # [batch..., heads, kv_len]
    groups = case.heads // case.kv_heads
    cols = cols.reshape(*cols.shape[:-2], case.kv_heads, groups, case.kv_len).all(-2)
    return rows, np.moveaxis(cols, -1, -2)


def check_finite_kv_padding(kernel: Callable[..., Any], case: Case) -> None:
    """With ``finite_kv_padding=True`` and finite values other than zero in the keys and
    values no query sees, outputs and gradients equal those of the default call with
    zeros there."""
    (q, k, v, bias), kwargs = make_inputs(case, jnp.float32)
    _, dead_k = _unreachable(case, kwargs)
    assert dead_k.any(), f"{case.name}: no unseen key to plant"
    rng = np.random.RandomState(2)
    dead = jnp.asarray(dead_k)[..., None]
    garbage = lambda x: jnp.where(dead, jnp.asarray(3.0 + rng.randn(*x.shape), x.dtype), x)
    cotangent = jnp.asarray(np.random.RandomState(1).randn(*output_shape(case)), jnp.float32)
    clean = (q, jnp.where(dead, 0.0, k), jnp.where(dead, 0.0, v), bias)
    out, grads = value_and_grads(kernel, clean, kwargs, cotangent)
    hinted = {**kwargs, "finite_kv_padding": True}
    out_h, grads_h = value_and_grads(kernel, (q, garbage(k), garbage(v), bias), hinted, cotangent)
    np.testing.assert_allclose(np.asarray(out_h), np.asarray(out), atol=1e-5, rtol=1e-5)
    for name, g, g_h in zip(("query", "key", "value"), grads, grads_h, strict=False):
        np.testing.assert_allclose(
            np.asarray(g_h), np.asarray(g), atol=1e-5, rtol=1e-5, err_msg=name
        )


def check_padding_never_leaks(kernel: Callable[..., Any], case: Case) -> None:
    """NaN and inf planted in padded / masked queries, keys and values: outputs and
    gradients equal those with zeros there (and are finite)."""
    (q, k, v, bias), kwargs = make_inputs(case, jnp.float32)
    dead_q, dead_k = _unreachable(case, kwargs)
    assert dead_k.any() or dead_q.any(), f"{case.name}: nothing to plant"

    def plant(x, dead, value):
        return jnp.where(jnp.asarray(dead)[..., None], jnp.asarray(value, x.dtype), x)

    cotangent = jnp.asarray(np.random.RandomState(1).randn(*output_shape(case)), jnp.float32)
    clean = (plant(q, dead_q, 0.0), plant(k, dead_k, 0.0), plant(v, dead_k, 0.0), bias)
    dirty = (plant(q, dead_q, np.nan), plant(k, dead_k, np.inf), plant(v, dead_k, np.nan), bias)
    out, grads = value_and_grads(kernel, clean, kwargs, cotangent)
    out_dirty, grads_dirty = value_and_grads(kernel, dirty, kwargs, cotangent)
    assert np.all(np.isfinite(np.asarray(out_dirty))), f"{case.name}: NaN/inf reached the output"
    np.testing.assert_allclose(np.asarray(out_dirty), np.asarray(out), atol=1e-6)
    for name, g, g_dirty in zip(("query", "key", "value"), grads, grads_dirty, strict=False):
        assert np.all(np.isfinite(np.asarray(g_dirty))), f"{case.name}: NaN/inf in d{name}"
        np.testing.assert_allclose(np.asarray(g_dirty), np.asarray(g), atol=1e-6, err_msg=name)


def check_vmap(kernel: Callable[..., Any], case: Case) -> None:
    """``kernel`` under ``jax.vmap`` equals the kernel's own batch and heads (float32):
    mapped over a new leading batch axis (each call then sees the case's batch), and over
    the key/value heads, each call seeing one kv head and its query heads. The case's
    keyword arguments must not depend on the batch (``Case`` without masks or lengths)."""
    (q, k, v, bias), kwargs = make_inputs(case, jnp.float32)
    (q2, k2, v2, _), _ = make_inputs(case, jnp.float32, seed=1)
    call = lambda q, k, v: kernel(q, k, v, bias, **kwargs)
    stacked = [jnp.stack(pair) for pair in ((q, q2), (k, k2), (v, v2))]
    expected = jnp.stack([jax.jit(call)(q, k, v), jax.jit(call)(q2, k2, v2)])
    err = max_error(jax.jit(jax.vmap(call))(*stacked), np.asarray(expected, np.float64))
    assert err <= TOLERANCES[jnp.float32][0], f"vmap over the batch: error {err:.3g}"
    if case.heads % case.kv_heads or bias is not None:
        return
    groups, axis = case.heads // case.kv_heads, q.ndim - 2  # the heads axis
    split = lambda x, g: x.reshape(*x.shape[:axis], case.kv_heads, g, x.shape[-1])
    mapped = jax.jit(jax.vmap(call, in_axes=axis, out_axes=axis))(
        split(q, groups), split(k, 1), split(v, 1)
    )
    expected = np.asarray(jax.jit(call)(q, k, v), np.float64)
    err = max_error(mapped.reshape(expected.shape), expected)
    assert err <= TOLERANCES[jnp.float32][0], f"vmap over the heads: error {err:.3g}"
