"""Boolean masks (``attn_jax.masks``) against brute-force definitions. True = may attend."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import masks

SHAPES = [(1, 1), (3, 3), (2, 5), (5, 2), (4, 7), (7, 4)]


def _brute(q_len: int, kv_len: int, allowed) -> np.ndarray:
    """``[q_len, kv_len]`` mask from a predicate ``allowed(i, j)`` (double loop)."""
    out = np.zeros((q_len, kv_len), bool)
    for i in range(q_len):
        for j in range(kv_len):
            out[i, j] = allowed(i, j)
    return out


def _np(x) -> np.ndarray:
    x = np.asarray(x)
    assert x.dtype == np.bool_, f"mask dtype {x.dtype}, expected bool"
    return x


# ---------------------------------------------------------------------------------- causal


@pytest.mark.parametrize(("q_len", "kv_len"), SHAPES)
def test_causal_mask_bottom_right_by_default(q_len, kv_len):
    got = _np(masks.causal_mask(q_len, kv_len))
    expected = _brute(q_len, kv_len, lambda i, j: j <= i + kv_len - q_len)
    np.testing.assert_array_equal(got, expected)
    # The last query always sees every key (KV-cache decoding), the first query sees
    # kv_len - q_len + 1 keys.
    assert got[-1].all()
    assert got[0].sum() == max(0, kv_len - q_len + 1)


@pytest.mark.parametrize(("q_len", "kv_len"), SHAPES)
def test_causal_mask_offset_zero_is_top_left(q_len, kv_len):
    got = _np(masks.causal_mask(q_len, kv_len, offset=0))
    np.testing.assert_array_equal(got, np.tril(np.ones((q_len, kv_len), bool)))


@pytest.mark.parametrize("offset", [-2, 1, 3])
def test_causal_mask_offset(offset):
    got = _np(masks.causal_mask(4, 6, offset=offset))
    np.testing.assert_array_equal(got, np.tril(np.ones((4, 6), bool), k=offset))


def test_causal_mask_decode_step_sees_whole_cache():
    np.testing.assert_array_equal(_np(masks.causal_mask(1, 5)), np.ones((1, 5), bool))


# ---------------------------------------------------------------------------------- window


@pytest.mark.parametrize(("q_len", "kv_len"), SHAPES)
@pytest.mark.parametrize(("left", "right"), [(0, 0), (1, 0), (0, 2), (2, 1), (9, 9)])
def test_window_mask_matches_brute_force(q_len, kv_len, left, right):
    shift = kv_len - q_len
    got = _np(masks.window_mask(q_len, kv_len, left, right))
    expected = _brute(q_len, kv_len, lambda i, j: i + shift - left <= j <= i + shift + right)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("offset", [0, -1, 2])
def test_window_mask_offset(offset):
    got = _np(masks.window_mask(5, 6, 1, 2, offset=offset))
    expected = _brute(5, 6, lambda i, j: i + offset - 1 <= j <= i + offset + 2)
    np.testing.assert_array_equal(got, expected)


def test_window_mask_with_right_zero_is_banded_causal():
    causal = _np(masks.causal_mask(6, 8))
    window = _np(masks.window_mask(6, 8, 8, 0))
    np.testing.assert_array_equal(window, causal)


# --------------------------------------------------------------------------------- lengths


def test_lengths_to_mask():
    lengths = np.array([[0, 3, 5], [1, 2, 4]])
    got = _np(masks.lengths_to_mask(jnp.asarray(lengths), 5))
    assert got.shape == (2, 3, 5)
    for idx in np.ndindex(lengths.shape):
        np.testing.assert_array_equal(got[idx], np.arange(5) < lengths[idx])
    assert not got[0, 0].any() and got[0, 2].all()


def test_lengths_to_mask_scalar():
    np.testing.assert_array_equal(
        _np(masks.lengths_to_mask(jnp.asarray(2), 4)), [True, True, False, False]
    )


@pytest.mark.parametrize("side", ["both", "query_only", "key_only", "neither"])
@pytest.mark.parametrize("batch", [(2,), (2, 3)])
def test_padding_mask(side, batch):
    q_len, kv_len = 4, 5
    rng = np.random.RandomState(0)
    q_lengths = rng.randint(0, q_len + 1, size=batch)
    kv_lengths = rng.randint(0, kv_len + 1, size=batch)
    use_q = side in ("both", "query_only")
    use_k = side in ("both", "key_only")
    got = _np(
        masks.padding_mask(
            jnp.asarray(kv_lengths) if use_k else None,
            kv_len,
            query_lengths=jnp.asarray(q_lengths) if use_q else None,
            q_len=q_len,
        )
    )
    out_batch = batch if (use_q or use_k) else ()
    out_q = q_len if use_q else 1  # keys only: [batch..., 1, 1, kv_len], broadcast over rows
    assert got.shape == (*out_batch, 1, out_q, kv_len)
    full = np.broadcast_to(got, (*batch, 1, q_len, kv_len))
    for b in np.ndindex(batch):
        q_ok = np.arange(q_len) < (q_lengths[b] if use_q else q_len)
        k_ok = np.arange(kv_len) < (kv_lengths[b] if use_k else kv_len)
        np.testing.assert_array_equal(full[b][0], q_ok[:, None] & k_ok[None, :])


def test_padding_mask_zero_lengths_mask_everything():
    got = masks.padding_mask(jnp.array([2, 0]), 2, query_lengths=jnp.array([0, 3]), q_len=3)
    assert not _np(got).any()


def test_padding_mask_needs_q_len_with_query_lengths():
    with pytest.raises(ValueError, match="q_len"):
        masks.padding_mask(None, 4, query_lengths=jnp.array([1, 2]))


def test_causal_mask_defaults_to_square():
    np.testing.assert_array_equal(_np(masks.causal_mask(4)), np.tril(np.ones((4, 4), bool)))


# --------------------------------------------------------------------------------- segment


def test_segment_mask_self():
    ids = np.array([[0, 0, 1, 1, 1], [2, 2, 2, 2, 5]])
    got = _np(masks.segment_mask(jnp.asarray(ids)))
    assert got.shape == (2, 1, 5, 5)
    for b in range(2):
        expected = _brute(5, 5, lambda i, j, b=b: ids[b, i] == ids[b, j])
        np.testing.assert_array_equal(got[b, 0], expected)
    assert not got[0, 0, 0, 2]


def test_segment_mask_cross():
    q_ids = np.array([[[0, 1, 1]], [[3, 3, 0]]])  # batch (2, 1)
    k_ids = np.array([[[1, 0, 1, 2]], [[0, 3, 3, 3]]])
    got = _np(masks.segment_mask(jnp.asarray(q_ids), jnp.asarray(k_ids)))
    assert got.shape == (2, 1, 1, 3, 4)
    for b in np.ndindex(2, 1):
        expected = _brute(3, 4, lambda i, j, b=b: q_ids[b][i] == k_ids[b][j])
        np.testing.assert_array_equal(got[b][0], expected)


# ----------------------------------------------------------------------------- combine


def test_combine_masks_all_none():
    assert masks.combine_masks() is None
    assert masks.combine_masks(None) is None
    assert masks.combine_masks(None, None, None) is None


def test_combine_masks_skips_none():
    m = np.array([[True, False], [False, True]])
    got = _np(masks.combine_masks(None, jnp.asarray(m), None))
    np.testing.assert_array_equal(got, m)


def test_combine_masks_broadcasts_and_ands():
    rng = np.random.RandomState(1)
    a = rng.rand(4, 5) < 0.5  # [q, kv]
    b = rng.rand(2, 1, 4, 5) < 0.5  # [batch, 1, q, kv]
    c = rng.rand(5) < 0.7  # [kv]
    got = _np(masks.combine_masks(jnp.asarray(a), None, jnp.asarray(b), jnp.asarray(c)))
    assert got.shape == (2, 1, 4, 5)
    np.testing.assert_array_equal(got, a & b & c)
    assert got.any() and not got.all()


def test_combine_masks_casts_to_bool():
    got = _np(masks.combine_masks(jnp.array([0, 1, 2]), jnp.array([True, True, False])))
    np.testing.assert_array_equal(got, [False, True, False])
