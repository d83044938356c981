"""Blockwise kernels (flash, chunked, sliding_window) with blocks smaller than the problem,
so block loops, padding, skipping and the custom VJP are really exercised."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels
from attn_jax.kernels import visibility as vis
from tests.kernels import conformance as cf

MULTI_BLOCK_CASES = [
    c
    for c in cf.CASES
    if c.name
    in (
        "random_mask",
        "causal_q_lt_kv",
        "causal_q_gt_kv",
        "padding_empty_keys",
        "window",
        "window_causal_q_lt_kv",
        "fully_masked_rows",
        "bias_and_mask",
        "cross_q_lt_kv",
        "gqa",
        "extra_batch_dims",
        "sharp_softmax",
    )
]
SMALL_BLOCKS = {
    "flash": functools.partial(kernels.get("flash"), block_q=3, block_k=4),
    "chunked": functools.partial(kernels.get("chunked"), query_chunk_size=4, key_chunk_size=3),
    "sliding_window": functools.partial(kernels.get("sliding_window"), block_size=3),
}


@pytest.mark.parametrize("case", MULTI_BLOCK_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", sorted(SMALL_BLOCKS))
def test_small_blocks_match_float64_reference(name, case):
    missing = case.needs() - set(kernels.capabilities(name).supported())
    if missing:
        cf.check_unsupported_raises(SMALL_BLOCKS[name], case)
        return
    cf.check_against_reference(SMALL_BLOCKS[name], case, jnp.float32)


def _visited(batch=1, lengths=None, segments=None, **kwargs):
    """How many of the 8 x 8 blocks of 8 x 8 tokens are not hidden."""
    positions = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (batch, 64))
    valid = jnp.ones((batch, 64), bool)
    if lengths is not None:
        valid = jnp.arange(64)[None, :] < jnp.asarray(lengths)[:, None]
    tokens = vis.Tokens(positions, valid, segments)
    classes = vis.block_classes(tokens, tokens, None, block_q=8, block_k=8, **kwargs)
    order, count = vis.visible_blocks(classes)
    shown = np.asarray(classes != vis.HIDDEN)
    for row, n, visible in zip(np.asarray(order), np.asarray(count), shown, strict=True):
        np.testing.assert_array_equal(row[:n], np.flatnonzero(visible))  # visible, in order
    return int(count.sum()), int((classes == vis.FULL).sum())


def test_causal_window_padding_and_segments_hide_whole_blocks():
    assert _visited(is_causal=False, window=None) == (64, 64)
    assert _visited(is_causal=True, window=None) == (36, 28)  # lower triangle; 8 partial
    assert _visited(is_causal=False, window=(8, 8)) == (2 * 2 + 6 * 3, 8)  # a 3-block band
    assert _visited(is_causal=True, window=(4, 0)) == (8 + 7, 0)
    # Padding: 20 valid tokens (blocks 0-2) in row 0, all 64 in row 1: a block is hidden
    # only if hidden in every row.
    assert _visited(lengths=[20], is_causal=False, window=None) == (9, 4)
    assert _visited(batch=2, lengths=[20, 64], is_causal=False, window=None) == (64, 4)
    # Four packed segments of 16 tokens: the 4 diagonal 2 x 2 groups of blocks.
    segments = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 16)[None, :]
    assert _visited(segments=segments, is_causal=False, window=None) == (16, 16)
    assert _visited(segments=segments, is_causal=True, window=None) == (12, 4)


def test_score_and_mask_functions_match_dense_arrays():
    (q, k, v, _), _ = cf.make_inputs(cf.Case("c", q_len=9, kv_len=11, heads=4), jnp.float32)
    slopes = jnp.arange(1, 5, dtype=jnp.float32)
    alibi = lambda s, b, h, qp, kp: s - 0.3 * slopes[h] * jnp.abs(qp - kp)
    stripes = lambda b, h, qp, kp: (qp + kp + b) % 3 != 0
    qp, kp = (jnp.arange(9) + 2)[:, None], jnp.arange(11)[None, :]  # bottom-right positions
    bias = -0.3 * slopes[:, None, None] * jnp.abs(qp - kp)
    mask = jnp.stack([(qp + kp + b) % 3 != 0 for b in range(2)])[:, None]
    dense = kernels.dot_product_attention(q, k, v, bias=bias, mask=mask)
    for name, options in (("flash", dict(block_q=4, block_k=4)), ("chunked", {})):
        out = kernels.dot_product_attention(
            q, k, v, score_fn=alibi, mask_fn=stripes, implementation=name, **options
        )
        np.testing.assert_allclose(out, dense, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="mask_fn"):
        kernels.flash_attention(q, k, v, mask_fn=lambda b, h, qp, kp: qp * 1.0)
    with pytest.raises(ValueError, match="score_fn"):
        kernels.flash_attention(q, k, v, score_fn="alibi")


def test_flash_residual_and_its_gradient_match_dot_product():
    case = cf.Case("c", q_len=7, kv_len=10, bias="full")
    (q, k, v, bias), _ = cf.make_inputs(case, jnp.float32)

    def loss(fn, q, k, v, bias):
        out, lse = fn(q, k, v, bias, is_causal=True, return_residual=True)
        return (out**2).sum() + (jnp.sin(lse)).sum()

    flash = functools.partial(kernels.flash_attention, block_q=3, block_k=4)
    want = jax.grad(functools.partial(loss, kernels.dot_product_attention), (0, 1, 2, 3))(
        q, k, v, bias
    )
    got = jax.grad(functools.partial(loss, flash), (0, 1, 2, 3))(q, k, v, bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    _, lse = flash(q, k, v, bias, return_residual=True)
    _, want_lse = kernels.dot_product_attention(q, k, v, bias, return_residual=True)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_block_sizes_are_checked():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="block_q"):
        kernels.flash_attention(q, q, q, block_q=0)


@pytest.mark.parametrize(
    "q_len, kv_len, heads, kv_heads, causal",
    [(13, 13, 2, 2, False), (7, 19, 4, 2, True), (19, 7, 2, 1, True), (24, 24, 2, 2, True)],
)
def test_pallas_flash_with_several_blocks_matches_float64_reference(
    q_len, kv_len, heads, kv_heads, causal
):
    case = cf.Case(
        "pallas", q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads, is_causal=causal
    )
    kernel = functools.partial(kernels.get("pallas_flash"), block_q=8, block_k=8)
    cf.check_against_reference(kernel, case, jnp.float32, record=False)


def test_pallas_flash_refuses_block_sizes_triton_cannot_tile():
    q = jnp.zeros((1, 32, 2, 8), jnp.float32)
    with pytest.raises(kernels.AttentionInputError, match=r"block_q.*power of two >= 16"):
        kernels.pallas_flash_attention(q, q, q, block_q=8, interpret=False)
    with pytest.raises(kernels.AttentionInputError, match=r"block_k.*power of two >= 16"):
        kernels.pallas_flash_attention(q, q, q, block_q=16, block_k=48, interpret=False)
