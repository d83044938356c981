"""Additive (Bahdanau), multiplicative (Luong) and pooling kernels vs the float64 reference.

Every value/gradient check compiles one program (``conformance.value_and_grads``), so the
cases are few and tiny; dtypes are crossed with a couple of core cases only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_jax import kernels
from attn_jax.kernels import AttentionInputError
from attn_jax.kernels import reference as ref
from tests.kernels import conformance as cf
from tests.kernels.conformance import Case

DTYPE_IDS = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}


def _close(actual: Any, expected: np.ndarray, tol: float, what: str) -> None:
    """Max absolute error of ``actual`` vs the float64 ``expected`` is within ``tol``."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= tol, f"{what}: error {err:.3g} > {tol}"


def _check_grads(names, grads, expected, inputs, tol, label):
    for name, g, x in zip(names, grads, inputs, strict=True):
        if x is None:
            assert g is None
            continue
        assert g.dtype == x.dtype, f"{label}: gradient of {name} has dtype {g.dtype}"
        _close(g, expected[name], tol, f"{label}: gradient of {name}")


def _empty_rows(case: Case, kwargs: dict[str, Any]) -> np.ndarray:
    """``[batch..., q_len, heads]`` True where the query row sees no key."""
    return np.moveaxis(~cf.visible_rows(case, kwargs), -1, -2)


def _cotangent(shape, dtype, seed=1):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape), dtype)


def _params(core, f32_only):
    """``core`` cases crossed with every dtype, ``f32_only`` cases in float32."""
    out = []
    for case in core:
        for dtype in cf.DTYPES:
            out.append(pytest.param(case, dtype, id=f"{case[0].name}-{DTYPE_IDS[dtype]}"))
    for case in f32_only:
        out.append(pytest.param(case, jnp.float32, id=f"{case[0].name}-float32"))
    return out


# ------------------------------------------------------------------------------- additive

_A = dict(q_len=4, kv_len=5, head_dim=4, v_dim=3)  # head_dim = Bahdanau "units"

# (case, v shared as [units])
ADDITIVE_CORE = [
    (Case("random_mask", **_A, mask="random"), False),
    (Case("causal_gqa_q_lt_kv", **{**_A, "q_len": 3, "kv_len": 7}, heads=4, is_causal=True), False),
]
ADDITIVE_F32 = [
    (Case("no_mask_shared_v", **_A), True),
    (Case("padding_lengths", **_A, q_lengths=(4, 2), kv_lengths=(0, 3)), False),
    (Case("fully_masked_rows", **_A, mask="rows"), False),
    (
        Case("causal_q_gt_kv_bias", **{**_A, "q_len": 6, "kv_len": 3}, is_causal=True, bias="full"),
        False,
    ),
    (Case("extra_batch_dims", **_A, batch=(2, 3), mask="random", mask_heads=False), True),
    (Case("no_batch_dims_window", **_A, batch=(), window=(1, 0)), False),
]


def _additive_inputs(case: Case, dtype: Any, shared_v: bool):
    (q, k, val, bias), kwargs = cf.make_inputs(case, dtype)
    rng = np.random.RandomState(2)
    v = rng.randn(case.head_dim) if shared_v else rng.randn(case.heads, case.head_dim)
    return (q, k, val, jnp.asarray(v, dtype), bias), kwargs


@pytest.mark.parametrize(("spec", "dtype"), _params(ADDITIVE_CORE, ADDITIVE_F32))
def test_additive_matches_reference(spec, dtype):
    case, shared_v = spec
    args, kwargs = _additive_inputs(case, dtype, shared_v)
    fwd_tol, grad_tol = cf.TOLERANCES[dtype]
    ct = _cotangent(cf.output_shape(case), dtype)
    out, grads = cf.value_and_grads(kernels.additive_attention, args, kwargs, ct)
    expected, expected_grads = ref.additive_attention(*args, d_out=ct, **kwargs)
    assert out.dtype == dtype
    _close(out, expected, fwd_tol, case.name)
    empty = _empty_rows(case, kwargs)
    assert np.all(np.asarray(out, np.float64)[empty] == 0.0), "fully-masked rows not zero"
    if case.name in ("padding_lengths", "fully_masked_rows", "causal_q_gt_kv_bias"):
        assert empty.any(), "case meant to have empty rows has none"
    names = ("query", "key", "value", "v", "bias")
    _check_grads(names, grads, expected_grads, args, grad_tol, case.name)


def test_additive_shared_v_equals_broadcast_v():
    case = Case("shared", **_A, mask="random")
    (q, k, val, v, _), kwargs = _additive_inputs(case, jnp.float32, shared_v=True)
    both = jax.jit(
        lambda v1, v2: (
            kernels.additive_attention(q, k, val, v1, **kwargs),
            kernels.additive_attention(q, k, val, v2, **kwargs),
        )
    )
    shared, full = both(v, jnp.broadcast_to(v, (case.heads, case.head_dim)))
    np.testing.assert_allclose(np.asarray(shared), np.asarray(full), atol=1e-6)
    # and the score vector matters (a kernel ignoring it would pass the line above).
    other = jax.jit(lambda v1: kernels.additive_attention(q, k, val, v1, **kwargs))(-2.0 * v)
    assert np.max(np.abs(np.asarray(other) - np.asarray(shared))) > 1e-2


# ------------------------------------------------------------------------- multiplicative

_M = dict(q_len=4, kv_len=5, head_dim=4, v_dim=3)  # head_dim = d_k; general uses d_q = 3
D_Q = 3


@dataclasses.dataclass(frozen=True)
class Mult:
    score: str = "dot"
    weight: str | None = None  # None, "per_head" [heads, d_q, d_k], "shared" [d_q, d_k]
    scale: float | None = None


MULT_CORE = [
    (Case("dot_random_mask", **_M, mask="random"), Mult()),
    (
        Case(
            "general_causal_gqa_q_lt_kv", **{**_M, "q_len": 3, "kv_len": 7}, heads=4, is_causal=True
        ),
        Mult("general", "per_head"),
    ),
]
MULT_F32 = [
    (Case("dot_no_mask_scale", **_M), Mult(scale=0.5)),
    (Case("dot_gqa_no_batch_dims_bias", **_M, batch=(), heads=4, bias="full"), Mult()),
    (Case("dot_padding_lengths", **_M, q_lengths=(3, 4), kv_lengths=(5, 0)), Mult()),
    (Case("general_shared_fully_masked_rows", **_M, mask="rows"), Mult("general", "shared")),
    (
        Case("general_shared_extra_batch", **_M, batch=(2, 3), mask="random", mask_heads=False),
        Mult("general", "shared"),
    ),
    (
        Case("general_window_padding", **_M, window=(2, 0), kv_lengths=(2, 5)),
        Mult("general", "per_head"),
    ),
]


def _mult_inputs(case: Case, mult: Mult, dtype: Any):
    (q, k, val, bias), kwargs = cf.make_inputs(case, dtype)
    rng = np.random.RandomState(3)
    weight = None
    if mult.score == "general":
        q = jnp.asarray(rng.randn(*case.batch, case.q_len, case.heads, D_Q), dtype)
        shape = (
            (D_Q, case.head_dim) if mult.weight == "shared" else (case.heads, D_Q, case.head_dim)
        )
        weight = jnp.asarray(0.6 * rng.randn(*shape), dtype)
    kwargs["score"] = mult.score
    if mult.scale is not None:
        kwargs["scale"] = mult.scale
    return (q, k, val, bias, weight), kwargs


def _mult_kernel(query, key, value, bias, weight, **kwargs):
    return kernels.multiplicative_attention(query, key, value, bias, weight=weight, **kwargs)


@pytest.mark.parametrize(("spec", "dtype"), _params(MULT_CORE, MULT_F32))
def test_multiplicative_matches_reference(spec, dtype):
    case, mult = spec
    args, kwargs = _mult_inputs(case, mult, dtype)
    mask_kwargs = {k: x for k, x in kwargs.items() if k not in ("score", "scale")}
    fwd_tol, grad_tol = cf.TOLERANCES[dtype]
    ct = _cotangent(cf.output_shape(case), dtype)
    out, grads = cf.value_and_grads(_mult_kernel, args, kwargs, ct)
    q, k, val, bias, weight = args
    expected, expected_grads = ref.multiplicative_attention(
        q, k, val, bias, weight=weight, d_out=ct, **kwargs
    )
    assert out.dtype == dtype
    _close(out, expected, fwd_tol, case.name)
    empty = _empty_rows(case, mask_kwargs)
    assert np.all(np.asarray(out, np.float64)[empty] == 0.0), "fully-masked rows not zero"
    names = ("query", "key", "value", "bias", "weight")
    _check_grads(names, grads, expected_grads, args, grad_tol, case.name)


# -------------------------------------------------------------------------------- pooling


@dataclasses.dataclass(frozen=True)
class Pool:
    """One pooling problem. ``source``: "query" ([heads, d]), "query_batched"
    ([batch..., heads, d]) or "scores"; ``key``: a separate key (else key = value)."""

    name: str
    source: str = "query"
    batch: tuple[int, ...] = (2,)
    length: int = 6
    heads: int = 2
    kv_heads: int = 2
    v_dim: int = 4
    key_dim: int | None = None  # separate key of this head dim
    mask: str | None = None  # None, "random", "empty" (random, one example all False)
    lengths: tuple[int, ...] | int | None = None
    scale: float | None = None


POOL_CORE = [
    (Pool("query_mask", mask="random"),),
    (Pool("scores_lengths", source="scores", lengths=(5, 2)),),
]
POOL_F32 = [
    (Pool("query_no_mask_scale", scale=0.3),),
    (Pool("query_batched_key_gqa", source="query_batched", heads=4, key_dim=3, mask="random"),),
    (Pool("query_no_batch_dims_lengths", batch=(), lengths=4),),
    (Pool("query_empty_rows", batch=(3,), mask="empty", lengths=(0, 3, 6)),),
    (Pool("scores_extra_batch_gqa", source="scores", batch=(2, 3), heads=4, mask="random"),),
    (
        Pool(
            "scores_no_batch_dims_mask",
            source="scores",
            batch=(),
            heads=3,
            kv_heads=1,
            mask="random",
        ),
    ),
]


def _pool_inputs(p: Pool, dtype: Any):
    rng = np.random.RandomState(4)
    d = p.key_dim or p.v_dim
    value = jnp.asarray(rng.randn(*p.batch, p.length, p.kv_heads, p.v_dim), dtype)
    key = None
    if p.key_dim is not None:
        key = jnp.asarray(rng.randn(*p.batch, p.length, p.kv_heads, d), dtype)
    if p.source == "scores":
        source = rng.randn(*p.batch, p.length, p.heads)
    elif p.source == "query_batched":
        source = rng.randn(*p.batch, p.heads, d)
    else:
        source = rng.randn(p.heads, d)
    source = jnp.asarray(source, dtype)
    kwargs: dict[str, Any] = {}
    if p.mask is not None:
        mask = rng.rand(*p.batch, p.length) < 0.6
        mask[..., 0] = True  # random rows are never empty by accident
        if p.mask == "empty":
            mask[1] = False
        kwargs["mask"] = jnp.asarray(mask)
    if p.lengths is not None:
        kwargs["lengths"] = jnp.asarray(p.lengths, jnp.int32)
    if p.scale is not None:
        kwargs["scale"] = p.scale
    return value, source, key, kwargs


def _pool_query(value, query, key, **kwargs):
    return kernels.attention_pooling(value, query=query, key=key, **kwargs)


def _pool_scores(value, scores, **kwargs):
    return kernels.attention_pooling(value, scores=scores, **kwargs)


def _pool_valid(p: Pool, kwargs) -> np.ndarray:
    valid = np.ones((*p.batch, p.length), bool)
    if "mask" in kwargs:
        valid &= np.asarray(kwargs["mask"])
    if "lengths" in kwargs:
        valid &= np.arange(p.length) < np.asarray(kwargs["lengths"])[..., None]
    return valid


@pytest.mark.parametrize(("spec", "dtype"), _params(POOL_CORE, POOL_F32))
def test_pooling_matches_reference(spec, dtype):
    (p,) = spec
    value, source, key, kwargs = _pool_inputs(p, dtype)
    fwd_tol, grad_tol = cf.TOLERANCES[dtype]
    ct = _cotangent((*p.batch, p.heads, p.v_dim), dtype)
    if p.source == "scores":
        args, names = (value, source), ("value", "scores")
        out, grads = cf.value_and_grads(_pool_scores, args, kwargs, ct)
        expected, expected_grads = ref.attention_pooling(value, scores=source, d_out=ct, **kwargs)
    else:
        args, names = (value, source, key), ("value", "query", "key")
        out, grads = cf.value_and_grads(_pool_query, args, kwargs, ct)
        expected, expected_grads = ref.attention_pooling(
            value, query=source, key=key, d_out=ct, **kwargs
        )
    assert out.dtype == dtype
    assert out.shape == (*p.batch, p.heads, p.v_dim)
    _close(out, expected, fwd_tol, p.name)
    empty = ~_pool_valid(p, kwargs).any(-1)  # [batch...]
    if p.mask == "empty" or p.lengths == (0, 3, 6):
        assert empty.any()
    assert np.all(np.asarray(out, np.float64)[empty] == 0.0), "fully-padded sequence not zero"
    _check_grads(names, grads, expected_grads, args, grad_tol, p.name)


# ------------------------------------------------------------------------ returned weights


def _check_weight_rows(weights: np.ndarray, visible: np.ndarray) -> None:
    np.testing.assert_allclose(weights.sum(-1), visible.astype(float), atol=1e-5)
    assert np.all(weights[~visible] == 0.0)
    assert np.all(weights >= 0.0)


@pytest.mark.parametrize("kind", ["additive", "multiplicative"])
def test_returned_weights(kind):
    case = Case("weights", q_len=5, kv_len=6, heads=4, head_dim=4, v_dim=3, mask="rows")
    if kind == "additive":
        (q, k, val, v, _), kwargs = _additive_inputs(case, jnp.float32, shared_v=False)
        fn = lambda q, k, val: kernels.additive_attention(
            q, k, val, v, **kwargs, return_weights=True
        )
        expected, expected_w = ref.additive_attention(q, k, val, v, return_weights=True, **kwargs)
    else:
        mult = Mult("general", "per_head")
        (q, k, val, _, w), kwargs = _mult_inputs(case, mult, jnp.float32)
        fn = lambda q, k, val: _mult_kernel(q, k, val, None, w, **kwargs, return_weights=True)
        expected, expected_w = ref.multiplicative_attention(
            q, k, val, weight=w, return_weights=True, **kwargs
        )
    out, weights = jax.jit(fn)(q, k, val)
    assert weights.shape == (*case.batch, case.heads, case.q_len, case.kv_len)
    assert weights.dtype == jnp.float32
    _close(weights, expected_w, 1e-5, "weights")
    _close(out, expected, 1e-5, "output")
    visible = cf.visible_rows(case, {k: x for k, x in kwargs.items() if k == "mask"})
    assert (~visible).any()
    _check_weight_rows(np.asarray(weights), visible)


@pytest.mark.parametrize("source", ["query", "scores"])
def test_pooling_returned_weights(source):
    p = Pool("weights", source=source, batch=(3,), heads=4, mask="empty", lengths=(6, 4, 2))
    value, src, _, kwargs = _pool_inputs(p, jnp.float32)
    kw = {"query" if source == "query" else "scores": src, **kwargs}
    out, weights = jax.jit(
        lambda value, kw: kernels.attention_pooling(value, return_weights=True, **kw)
    )(value, kw)
    expected, expected_w = ref.attention_pooling(value, return_weights=True, **kw)
    assert weights.shape == (*p.batch, p.heads, p.length)
    _close(weights, expected_w, 1e-5, "weights")
    _close(out, expected, 1e-5, "output")
    valid = _pool_valid(p, kwargs)
    visible = np.broadcast_to(valid.any(-1)[:, None], (*p.batch, p.heads))
    _check_weight_rows(np.asarray(weights), visible)
    # Padding positions get exactly zero weight.
    assert np.all(np.asarray(weights)[np.broadcast_to(~valid[:, None, :], weights.shape)] == 0.0)


# ----------------------------------------------------------------------------- bad inputs


def _small():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 3, 2, 4), jnp.float32)
    k = jnp.asarray(rng.randn(2, 5, 2, 4), jnp.float32)
    val = jnp.asarray(rng.randn(2, 5, 2, 3), jnp.float32)
    return q, k, val


def _bad_calls():
    q, k, val = _small()
    v_good = jnp.ones((2, 4))
    pool_v = jnp.ones((2, 5, 2, 4))
    pool_q = jnp.ones((2, 4))
    pool_s = jnp.ones((2, 5, 2))
    add = kernels.additive_attention
    mult = kernels.multiplicative_attention
    pool = kernels.attention_pooling
    return [
        ("additive_v_wrong_units", lambda: add(q, k, val, jnp.ones((2, 3))), "v"),
        ("additive_v_wrong_heads", lambda: add(q, k, val, jnp.ones((3, 4))), "v"),
        ("additive_v_rank3", lambda: add(q, k, val, jnp.ones((1, 2, 4))), "v"),
        ("additive_v_integer", lambda: add(q, k, val, jnp.ones((2, 4), jnp.int32)), "v"),
        ("additive_mask_float", lambda: add(q, k, val, v_good, mask=jnp.ones((3, 5))), "mask"),
        ("mult_unknown_score", lambda: mult(q, k, val, score="concat"), "score"),
        ("mult_general_no_weight", lambda: mult(q, k, val, score="general"), "weight"),
        ("mult_dot_with_weight", lambda: mult(q, k, val, weight=jnp.ones((4, 4))), "weight"),
        (
            "mult_general_weight_wrong_dq",
            lambda: mult(q, k, val, score="general", weight=jnp.ones((3, 4))),
            "weight",
        ),
        (
            "mult_general_weight_wrong_heads",
            lambda: mult(q, k, val, score="general", weight=jnp.ones((3, 4, 4))),
            "weight",
        ),
        ("pool_both", lambda: pool(pool_v, query=pool_q, scores=pool_s), "query"),
        ("pool_neither", lambda: pool(pool_v), "query"),
        (
            "pool_mask_not_bool",
            lambda: pool(pool_v, query=pool_q, mask=jnp.ones((2, 5), jnp.int32)),
            "mask",
        ),
        (
            "pool_mask_wrong_shape",
            lambda: pool(pool_v, query=pool_q, mask=jnp.ones((2, 4), bool)),
            "mask",
        ),
        (
            "pool_lengths_float",
            lambda: pool(pool_v, query=pool_q, lengths=jnp.array([2.0, 3.0])),
            "lengths",
        ),
        ("pool_scores_wrong_length", lambda: pool(pool_v, scores=jnp.ones((2, 4, 2))), "scores"),
        ("pool_scores_int", lambda: pool(pool_v, scores=jnp.ones((2, 5, 2), jnp.int32)), "scores"),
        ("pool_query_rank1", lambda: pool(pool_v, query=jnp.ones((4,))), "query"),
        (
            "mult_general_weight_wrong_dk",
            lambda: mult(q, k, val, score="general", weight=jnp.ones((4, 6))),
            "weight",
        ),
        ("pool_scores_with_scale", lambda: pool(pool_v, scores=pool_s, scale=2.0), "scale"),
        ("pool_query_wrong_batch", lambda: pool(pool_v, query=jnp.ones((3, 2, 4))), "query"),
        ("pool_scores_with_key", lambda: pool(pool_v, scores=pool_s, key=pool_v), "key"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_naming_the_argument(index):
    _, call, argument = _bad_calls()[index]
    with pytest.raises(ValueError, match=f"'{argument}'") as info:
        call()
    assert isinstance(info.value, AttentionInputError)


def test_attention_input_error_is_value_error():
    assert issubclass(AttentionInputError, ValueError)


# ------------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "kernel", "interface"),
    [
        ("additive", kernels.additive_attention, "additive"),
        ("multiplicative", kernels.multiplicative_attention, "multiplicative"),
        ("pooling", kernels.attention_pooling, "pooling"),
    ],
)
def test_registry_names(name, kernel, interface):
    assert kernels.get(name) is kernel
    assert name in kernels.available(interface=interface)
    assert kernels.capabilities(name).interface == interface
    assert kernels.capabilities(name).exact


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("is_causal", True),
        ("bias", jnp.zeros((2, 5))),
        ("local_window_size", 2),
        ("dropout_rate", 0.1),
        ("query_seq_lengths", jnp.array([1, 2])),
        ("return_residual", True),
    ],
)
def test_pooling_registry_refuses_unsupported(argument, value):
    pool_v, pool_q = jnp.ones((2, 5, 2, 4)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=f"'{argument}'"):
        kernels.get("pooling")(pool_v, query=pool_q, **{argument: value})


def test_pooling_registry_accepts_inactive_and_supported_arguments():
    rng = np.random.RandomState(5)
    value = jnp.asarray(rng.randn(2, 5, 2, 4), jnp.float32)
    query = jnp.asarray(rng.randn(2, 4), jnp.float32)
    mask = jnp.asarray(rng.rand(2, 5) < 0.7).at[:, 0].set(True)
    pool = kernels.get("pooling")
    out = jax.jit(
        lambda value, query, mask: pool(
            value, query=query, mask=mask, is_causal=False, bias=None, dropout_rate=0.0
        )
    )(value, query, mask)
    expected = ref.attention_pooling(value, query=query, mask=mask)
    _close(out, expected, 1e-5, "pooling via registry")
    with pytest.raises(ValueError, match="'not_an_argument'"):
        pool(value, query=query, not_an_argument=1)


# ----------------------------------------------------------------------------- hypothesis


@functools.partial(jax.jit, static_argnames=("is_causal",))
def _additive_vg(args, mask, q_lengths, kv_lengths, cotangent, is_causal):
    """Cached across examples of the same shapes (masks and lengths are traced)."""

    def f(*a):
        return kernels.additive_attention(
            *a,
            mask=mask,
            is_causal=is_causal,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
        )

    out, vjp = jax.vjp(f, *args)
    return out, vjp(cotangent)


@st.composite
def additive_problems(draw):
    batch = draw(st.sampled_from([(), (2,)]))
    heads, kv_heads = draw(st.sampled_from([(2, 1), (2, 2)]))
    q_len, kv_len = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    is_causal = draw(st.booleans())
    shared_v = draw(st.booleans())
    density = draw(st.sampled_from([0.3, 0.7, 1.0]))
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    q = rng.randn(*batch, q_len, heads, 3)
    k = rng.randn(*batch, kv_len, kv_heads, 3)
    val = rng.randn(*batch, kv_len, kv_heads, 2)
    v = rng.randn(3) if shared_v else rng.randn(heads, 3)
    args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, val, v))
    mask = jnp.asarray(rng.rand(*batch, heads, q_len, kv_len) < density)
    q_lengths = jnp.asarray(rng.randint(0, q_len + 1, size=batch), jnp.int32)
    kv_lengths = jnp.asarray(rng.randint(0, kv_len + 1, size=batch), jnp.int32)
    ct = jnp.asarray(rng.randn(*batch, q_len, heads, 2), jnp.float32)
    return args, mask, q_lengths, kv_lengths, ct, is_causal


@settings(max_examples=25)
@given(problem=additive_problems())
def test_additive_property_matches_reference(problem):
    args, mask, q_lengths, kv_lengths, ct, is_causal = problem
    out, grads = _additive_vg(args, mask, q_lengths, kv_lengths, ct, is_causal)
    kwargs = dict(
        mask=mask,
        is_causal=is_causal,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
    )
    expected, expected_grads = ref.additive_attention(*args, d_out=ct, **kwargs)
    fwd_tol, grad_tol = cf.TOLERANCES[jnp.float32]
    _close(out, expected, fwd_tol, "output")
    q = args[0]
    allowed = ref.full_mask(q.shape[:-3], q.shape[-2], q.shape[-3], args[1].shape[-3], **kwargs)
    empty = np.moveaxis(~allowed.any(-1), -1, -2)
    assert np.all(np.asarray(out)[empty] == 0.0)
    _check_grads(("query", "key", "value", "v"), grads, expected_grads, args, grad_tol, "additive")


def test_multiplicative_scale_none_is_unscaled():
    q, k, val = _small()
    np.testing.assert_array_equal(
        kernels.multiplicative_attention(q, k, val, scale=None),
        kernels.multiplicative_attention(q, k, val, scale=1.0),
    )
