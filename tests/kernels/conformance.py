"""Conformance checks for ``dot_product``-interface kernels against the float64 reference.

The parametrised tests in ``test_conformance.py`` call these functions for every exact
kernel in the registry; ``test_suite_can_fail.py`` feeds them deliberately wrong kernels
to prove they catch real bugs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.kernels import reference as ref

# Tolerances against float64 (README, Testing): dtype -> (forward atol, gradient atol).
TOLERANCES = {
    jnp.float32: (1e-5, 1e-4),
    jnp.bfloat16: (2e-2, 5e-2),
    jnp.float16: (5e-3, 1e-2),
}
DTYPES = list(TOLERANCES)

# Largest error seen per dtype in this test session: {dtype name: {"forward": x, "grad": y}}.
MAX_ERRORS: dict[str, dict[str, float]] = {}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. ``mask`` is a kind: None, "random", "rows" (some rows empty),
    "columns" (some keys hidden from every query, and some rows empty)."""

    name: str
    batch: tuple[int, ...] = (2,)
    q_len: int = 6
    kv_len: int = 6
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    v_dim: int | None = None
    mask: str | None = None
    mask_heads: bool = True  # mask carries a heads axis (else broadcast over heads)
    bias: str | None = None  # None, "full", "broadcast" ([heads, q, kv])
    is_causal: bool = False
    window: Any = None
    q_lengths: tuple[int, ...] | None = None
    kv_lengths: tuple[int, ...] | None = None
    segments: str | None = None  # None, "packed" (q_len == kv_len), "cross"
    positions: bool = False  # explicit query positions: the last q_len of each kv length
    alignment: str = "bottom_right"
    q_scale: float = 1.0  # > 1 sharpens the softmax (large logits)

    def needs(self) -> set[str]:
        """Capabilities this case exercises."""
        need = set()
        if self.mask:
            need.add("mask")
        if self.bias:
            need.add("bias")
        if self.is_causal:
            need.add("causal")
        if self.window is not None:
            need.add("window")
        if self.q_lengths is not None or self.kv_lengths is not None:
            need.add("seq_lengths")
        if self.heads != self.kv_heads:
            need.add("gqa")
        if self.segments:
            need.add("segments")
        if self.positions or (self.alignment != "bottom_right" and self.q_len != self.kv_len):
            need.add("positions")
        return need


CASES = [
    Case("no_mask"),
    Case("random_mask", mask="random"),
    Case("random_mask_broadcast_heads", mask="random", mask_heads=False, heads=3, kv_heads=3),
    Case("causal_square", is_causal=True),
    Case("causal_q_lt_kv", q_len=3, kv_len=7, is_causal=True),
    Case("causal_q_gt_kv", q_len=7, kv_len=4, is_causal=True),
    Case("padding_lengths", q_lengths=(4, 6), kv_lengths=(3, 6)),
    Case("padding_empty_keys", q_lengths=(6, 2), kv_lengths=(0, 5)),
    Case("window", q_len=8, kv_len=8, window=(2, 1)),
    Case("window_int", q_len=8, kv_len=8, window=1),
    Case("window_causal_q_lt_kv", q_len=4, kv_len=9, window=(3, 0), is_causal=True),
    Case("fully_masked_rows", mask="rows"),
    Case("bias", bias="full"),
    Case("bias_and_mask", bias="full", mask="random"),
    Case("bias_broadcast_and_causal", bias="broadcast", is_causal=True),
    Case("cross_q_gt_kv", q_len=9, kv_len=4),
    Case("cross_q_lt_kv", q_len=2, kv_len=11, mask="random"),
    Case("gqa", heads=4, kv_heads=2, is_causal=True),
    Case("mqa", heads=4, kv_heads=1, mask="random"),
    Case("value_head_dim", v_dim=5, is_causal=True),
    Case("extra_batch_dims", batch=(2, 3), mask="random", mask_heads=False),
    Case("no_batch_dims", batch=(), bias="full"),
    Case("single_query", q_len=1, kv_len=7, is_causal=True),
    Case("sharp_softmax", q_scale=8.0, kv_len=16, mask="random"),
    Case("segments_packed_causal", q_len=8, kv_len=8, segments="packed", is_causal=True),
    Case("segments_cross", q_len=5, kv_len=9, segments="cross"),
    Case(
        "segments_window_lengths",
        q_len=8,
        kv_len=8,
        segments="packed",
        window=(2, 0),
        kv_lengths=(8, 6),
    ),
    Case(
        "decode_positions_window",
        q_len=2,
        kv_len=9,
        positions=True,
        is_causal=True,
        window=(3, 0),
        kv_lengths=(6, 9),
        heads=4,
        kv_heads=2,
    ),
    Case("top_left_causal_q_lt_kv", q_len=3, kv_len=7, is_causal=True, alignment="top_left"),
    Case("top_left_causal_q_gt_kv", q_len=7, kv_len=4, is_causal=True, alignment="top_left"),
    Case("masked_columns", mask="columns", kv_len=9),
]


def make_inputs(case: Case, dtype: Any, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
    """``((query, key, value, bias), kwargs)`` for ``case`` in ``dtype`` (mask in kwargs)."""
    rng = np.random.RandomState(seed)
    v_dim = case.v_dim or case.head_dim
    q = case.q_scale * rng.randn(*case.batch, case.q_len, case.heads, case.head_dim)
    k = rng.randn(*case.batch, case.kv_len, case.kv_heads, case.head_dim)
    v = rng.randn(*case.batch, case.kv_len, case.kv_heads, v_dim)
    bias = None
    if case.bias == "full":
        bias = 0.5 * rng.randn(*case.batch, case.heads, case.q_len, case.kv_len)
    elif case.bias == "broadcast":
        bias = 0.5 * rng.randn(case.heads, case.q_len, case.kv_len)
    kwargs: dict[str, Any] = {}
    mask_heads = case.heads if case.mask_heads else 1
    mask_shape = (*case.batch, mask_heads, case.q_len, case.kv_len)
    if case.mask == "random":
        kwargs["mask"] = jnp.asarray(rng.rand(*mask_shape) < 0.7)
    elif case.mask == "rows":
        mask = rng.rand(*mask_shape) < 0.7
        mask[..., ::2, :] = False  # every other query row sees nothing
        kwargs["mask"] = jnp.asarray(mask)
    elif case.mask == "columns":
        mask = rng.rand(*mask_shape) < 0.8
        mask[..., ::3] = False  # every third key is seen by no query
        mask[..., ::4, :] = False
        kwargs["mask"] = jnp.asarray(mask)
    if case.is_causal:
        kwargs["is_causal"] = True
    if case.window is not None:
        kwargs["local_window_size"] = case.window
    # Integer arrays in jax's default integer dtype: int64 under jax_enable_x64.
    if case.q_lengths is not None:
        kwargs["query_seq_lengths"] = jnp.asarray(np.asarray(case.q_lengths))
    if case.kv_lengths is not None:
        kwargs["key_value_seq_lengths"] = jnp.asarray(np.asarray(case.kv_lengths))
    if case.segments is not None:
        # Sorted ids (packed sequences), unaligned between queries and keys for "cross".
        q_seg = np.sort(rng.randint(0, 3, size=(*case.batch, case.q_len)), axis=-1)
        kwargs["query_segment_ids"] = jnp.asarray(q_seg)
        if case.segments == "cross":
            kv_seg = np.sort(rng.randint(0, 3, size=(*case.batch, case.kv_len)), axis=-1)
            kwargs["key_value_segment_ids"] = jnp.asarray(kv_seg)
    if case.positions:  # a KV cache: queries are the last q_len tokens of each sequence
        lengths = np.broadcast_to(case.kv_lengths or case.kv_len, case.batch)
        positions = np.asarray(lengths)[..., None] - case.q_len + np.arange(case.q_len)
        kwargs["query_positions"] = jnp.asarray(positions)
    if case.alignment != "bottom_right":
        kwargs["causal_alignment"] = case.alignment
    arrays = tuple(None if x is None else jnp.asarray(x, dtype) for x in (q, k, v, bias))
    return arrays, kwargs


def visible_rows(case: Case, kwargs: dict[str, Any]) -> np.ndarray:
    """``[batch..., heads, q_len]`` boolean: rows with at least one visible key."""
    allowed = ref.full_mask(case.batch, case.heads, case.q_len, case.kv_len, **kwargs)
    return allowed.any(-1)


def _record(dtype: Any, kind: str, err: float) -> None:
    entry = MAX_ERRORS.setdefault(jnp.dtype(dtype).name, {"forward": 0.0, "grad": 0.0})
    entry[kind] = max(entry[kind], err)


def _max_err(actual: Any, expected: np.ndarray) -> float:
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


def output_shape(case: Case) -> tuple[int, ...]:
    return (*case.batch, case.q_len, case.heads, case.v_dim or case.head_dim)


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
    err = _max_err(out, expected)
    if record:
        _record(dtype, "forward", err)
    assert err <= fwd_tol, f"{case.name}: forward error {err:.3g} > {fwd_tol}"
    # Rows that see no key are exactly zero.
    empty = ~visible_rows(case, kwargs)  # [batch..., heads, q_len]
    rows = np.moveaxis(empty, -1, -2)  # [batch..., q_len, heads]
    assert np.all(np.asarray(out, np.float64)[rows] == 0.0), "fully-masked rows not zero"
    for name, g in zip(("query", "key", "value", "bias"), grads, strict=True):
        if expected_grads.get(name) is None:
            continue
        assert g.dtype == dtype, f"gradient of {name} has dtype {g.dtype}, expected {dtype}"
        err = _max_err(g, expected_grads[name])
        if record:
            _record(dtype, "grad", err)
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
    with pytest.raises(ValueError):
        kernel(q, k, v, bias, **kwargs)


def uniform_dropout_problem(
    batch: int = 4, heads: int = 4, q_len: int = 16, kv_len: int = 32
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries of zeros (uniform weights ``1/kv_len``) and one-hot values, so the output
    ``[..., q, h, j]`` equals the weight of key ``j`` after dropout."""
    q = jnp.zeros((batch, q_len, heads, 8))
    k = jnp.ones((batch, kv_len, heads, 8))
    v = jnp.broadcast_to(jnp.eye(kv_len)[:, None, :], (batch, kv_len, heads, kv_len))
    return q, k, v


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
