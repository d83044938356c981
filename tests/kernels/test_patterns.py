"""attn_jax.kernels.patterns: each score / mask function against a NumPy loop, in the dense
and the blockwise layouts, and through the kernels against the same pattern as arrays."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels
from attn_jax.kernels import patterns

B, H, N = 2, 4, 24


def _dense_grid():
    """``(batch, head, q_pos, kv_pos)`` for ``[B, H, N, N]``."""
    return (
        jnp.arange(B).reshape(B, 1, 1, 1),
        jnp.arange(H).reshape(1, H, 1, 1),
        jnp.arange(N).reshape(1, 1, N, 1),
        jnp.arange(N).reshape(1, 1, 1, N),
    )


def _block_grid():
    """The same pairs in the blockwise layout ``[B, kv_heads=2, groups=2, N, N]``."""
    return (
        jnp.arange(B).reshape(B, 1, 1, 1, 1),
        jnp.arange(H).reshape(1, 2, 2, 1, 1),
        jnp.broadcast_to(jnp.arange(N), (B, N))[:, None, None, :, None],
        jnp.broadcast_to(jnp.arange(N), (B, N))[:, None, None, None, :],
    )


def _loop(fn) -> np.ndarray:
    """``fn(b, h, i, j)`` (Python) over every pair: ``[B, H, N, N]``."""
    out = np.zeros((B, H, N, N), bool)
    for b, h, i, j in np.ndindex(B, H, N, N):
        out[b, h, i, j] = fn(b, h, i, j)
    return out


DOCS = np.repeat(np.arange(4), 6)[None].repeat(B, 0)
DOCS[1] = np.repeat(np.arange(3), 8)
BIGBIRD = patterns.bigbird_mask(jax.random.key(0), N, block_size=4, num_random_blocks=1)
TABLE = BIGBIRD.random_blocks
MASKS = {
    "document": (
        patterns.document_mask(jnp.asarray(DOCS)),
        lambda b, h, i, j: DOCS[b, i] == DOCS[b, j],
    ),
    "prefix_lm": (
        patterns.prefix_lm_mask(jnp.array([5, 9])),
        lambda b, h, i, j: j <= i or j < (5, 9)[b],
    ),
    "dilated": (
        patterns.dilated_mask(3, window=9, causal=True),
        lambda b, h, i, j: (i - j) % 3 == 0 and abs(i - j) <= 9 and j <= i,
    ),
    "strided": (
        patterns.strided_mask(4),
        lambda b, h, i, j: i - j >= 0 and ((i - j) < 4 or (i - j) % 4 == 0),
    ),
    "global": (
        patterns.global_tokens_mask(2, 3),
        lambda b, h, i, j: abs(i - j) <= 3 or i < 2 or j < 2,
    ),
    "bigbird": (
        BIGBIRD,
        lambda b, h, i, j: (
            abs(i // 4 - j // 4) <= 1 or i < 4 or j < 4 or TABLE[i // 4, 0] == j // 4
        ),
    ),
    "any_of": (
        patterns.any_of(patterns.strided_mask(5), patterns.global_tokens_mask(1, 0)),
        lambda b, h, i, j: (
            (i - j >= 0 and ((i - j) < 5 or (i - j) % 5 == 0)) or i == j or i < 1 or j < 1
        ),
    ),
    "all_of": (
        patterns.all_of(patterns.dilated_mask(2), patterns.global_tokens_mask(0, 6)),
        lambda b, h, i, j: (i - j) % 2 == 0 and abs(i - j) <= 6,
    ),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_functions_match_their_definition_in_both_layouts(name):
    fn, definition = MASKS[name]
    want = _loop(definition)
    dense = np.broadcast_to(np.asarray(fn(*_dense_grid())), want.shape)
    np.testing.assert_array_equal(dense, want)
    block = np.broadcast_to(np.asarray(fn(*_block_grid())), (B, 2, 2, N, N))
    np.testing.assert_array_equal(block.reshape(B, H, N, N), want)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(patterns.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads.
    sixteen = [2.0 ** (-8 * i / 16) for i in range(1, 17)]
    np.testing.assert_allclose(
        patterns.alibi_slopes(12), [2.0**-i for i in range(1, 9)] + sixteen[0::2][:4], rtol=1e-6
    )


def test_t5_buckets_match_hand_computed_values():
    bucket = lambda r, **kw: int(patterns.t5_relative_position_bucket(jnp.asarray(r), **kw))
    # Bidirectional, 32 buckets: 16 per direction, exact below 8.
    assert [bucket(r) for r in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
    big = 8 + int(math.log(20 / 8) / math.log(128 / 8) * 8)
    assert bucket(-20) == big and bucket(20) == 16 + big
    assert bucket(-1000) == 15 and bucket(1000) == 31
    # Causal: keys after the query share bucket 0; 32 buckets, exact below 16.
    assert [bucket(r, bidirectional=False) for r in (5, 0, -3, -15)] == [0, 0, 3, 15]
    assert bucket(-1000, bidirectional=False) == 31


def test_score_function_parameters_get_gradients():
    grid = _dense_grid()
    score = jnp.zeros((B, H, N, N))
    grad = jax.grad(lambda s: patterns.alibi(s)(score, *grid).sum())(jnp.ones(H))
    distance = np.arange(N)[:, None] - np.arange(N)[None, :]
    np.testing.assert_allclose(grad, np.full(H, -B * distance.sum()))
    table = jnp.zeros((H, 32))
    grad = jax.grad(lambda t: patterns.t5_relative_bias(t)(score, *grid).sum())(table)
    buckets = np.asarray(patterns.t5_relative_position_bucket(jnp.asarray(-distance)))
    counts = np.bincount(buckets.ravel(), minlength=32) * B
    np.testing.assert_allclose(grad, np.broadcast_to(counts, (H, 32)))
    chained = patterns.chain_scores(patterns.alibi(jnp.ones(H)), lambda s, *_: 2 * s)
    np.testing.assert_allclose(chained(score, *grid), -2 * np.broadcast_to(distance, (B, H, N, N)))


def test_bigbird_pattern_is_keyed():
    again = patterns.bigbird_mask(jax.random.key(0), N, block_size=4, num_random_blocks=1)
    other = patterns.bigbird_mask(jax.random.key(1), 96, block_size=4, num_random_blocks=2)
    np.testing.assert_array_equal(again.random_blocks, TABLE)
    first = patterns.bigbird_mask(jax.random.key(0), 96, block_size=4, num_random_blocks=2)
    assert not np.array_equal(first.random_blocks, other.random_blocks)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: patterns.strided_mask(0), "stride"),
        (lambda: patterns.dilated_mask(2, window=-1), "window"),
        (lambda: patterns.alibi_slopes(0), "heads"),
        (lambda: patterns.t5_relative_bias(jnp.zeros(3)), "table"),
        (lambda: patterns.document_mask(jnp.zeros((2, 3))), "document_ids"),
        (
            lambda: patterns.bigbird_mask(jax.random.key(0), 8, block_size=4, num_random_blocks=3),
            "num_random_blocks",
        ),
        (lambda: patterns.any_of(), "mask_fns"),
    ],
)
def test_bad_arguments_are_named(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize("name", ["flash", "chunked"])
def test_patterns_through_the_kernels_equal_their_dense_arrays(name):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, N, H, 8)), jnp.float32) for _ in range(3))
    options = (
        dict(block_q=8, block_k=8)
        if name == "flash"
        else dict(query_chunk_size=8, key_chunk_size=8)
    )
    grid = _dense_grid()
    for fn, _ in MASKS.values():
        dense = jnp.broadcast_to(fn(*grid), (B, H, N, N))
        want = kernels.dot_product_attention(q, k, v, mask=dense)
        got = kernels.dot_product_attention(q, k, v, mask_fn=fn, implementation=name, **options)
        np.testing.assert_allclose(got, want, atol=1e-5)
    table = jnp.asarray(rng.normal(size=(H, 32)), jnp.float32)
    for fn in (patterns.alibi(patterns.alibi_slopes(H)), patterns.t5_relative_bias(table)):
        bias = fn(jnp.zeros((B, H, N, N)), *grid)
        want = kernels.dot_product_attention(q, k, v, bias=bias, is_causal=True)
        got = kernels.dot_product_attention(
            q, k, v, score_fn=fn, is_causal=True, implementation=name, **options
        )
        np.testing.assert_allclose(got, want, atol=1e-5)
