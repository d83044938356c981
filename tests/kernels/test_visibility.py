"""The visibility model: its dense form against the float64 reference's definition, block
classification and reachability against the dense form, and its argument checks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_jax.kernels import reference as ref
from attn_jax.kernels import visibility as vis


@st.composite
def visibility_problems(draw):
    """Random ``vis.build`` arguments: shapes, masks, lengths, segments, positions."""
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    heads = draw(st.integers(1, 2))
    q_len, kv_len = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    kwargs = {}
    mask_kind = draw(st.sampled_from(["none", "full", "no_heads", "2d", "kv_only"]))
    if mask_kind != "none":
        shape = {
            "full": (*batch, heads, q_len, kv_len),
            "no_heads": (*batch, 1, q_len, kv_len),
            "2d": (q_len, kv_len),
            "kv_only": (kv_len,),
        }[mask_kind]
        kwargs["mask"] = rng.rand(*shape) < draw(st.sampled_from([0.3, 0.8]))
    kwargs["is_causal"] = draw(st.booleans())
    kwargs["local_window_size"] = draw(
        st.one_of(st.none(), st.integers(0, 4), st.tuples(st.integers(0, 4), st.integers(0, 4)))
    )
    if draw(st.booleans()):
        kwargs["query_seq_lengths"] = rng.randint(0, q_len + 1, size=batch)
    if draw(st.booleans()):
        kwargs["key_value_seq_lengths"] = rng.randint(0, kv_len + 1, size=batch)
    if draw(st.booleans()):  # sorted, like packed sequences, but not always aligned
        kwargs["query_segment_ids"] = np.sort(rng.randint(0, 3, size=(*batch, q_len)), -1)
        kwargs["key_value_segment_ids"] = np.sort(rng.randint(0, 3, size=(*batch, kv_len)), -1)
    if draw(st.booleans()):
        kwargs["query_positions"] = rng.randint(0, 9, size=(*batch, q_len))
    if draw(st.booleans()):
        kwargs["key_value_positions"] = rng.randint(0, 9, size=(kv_len,))
    kwargs["causal_alignment"] = draw(st.sampled_from(vis.ALIGNMENTS))
    return batch, heads, q_len, kv_len, kwargs


def _build(batch, heads, q_len, kv_len, kwargs):
    arrays = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    return vis.build(batch, heads, q_len, kv_len, **arrays)


@settings(max_examples=15)
@given(p=visibility_problems())
def test_dense_mask_matches_the_reference_definition(p):
    batch, heads, q_len, kv_len, kwargs = p
    expected = ref.full_mask(batch, heads, q_len, kv_len, **kwargs)
    with jax.numpy_rank_promotion("raise"):
        got = _build(*p).dense_mask()
    target = (*batch, heads, q_len, kv_len)
    if got is None:
        assert expected.all()
        return
    assert got.ndim == len(target), "the dense mask has the logits' rank"
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), target), expected)


# One small compiled program per problem: cheaper than dispatching every op eagerly.
_block_classes = jax.jit(
    vis.block_classes, static_argnames=("block_q", "block_k", "is_causal", "window")
)


@settings(max_examples=12)
@given(p=visibility_problems(), block_q=st.integers(1, 4), block_k=st.integers(1, 4))
def test_block_classes_are_conservative_and_reachability_sound(p, block_q, block_k):
    batch, heads, q_len, kv_len, kwargs = p
    if batch == (2, 3):
        return  # the blockwise kernels flatten the batch; one batch dimension suffices here
    visibility = _build(*p)
    dense = ref.full_mask(batch, heads, q_len, kv_len, **kwargs)
    dense = dense.reshape(int(np.prod(batch)), heads, q_len, kv_len)
    q_tok, k_tok = visibility.tokens()
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)

    def canonical(t, n, padded):
        from attn_jax.kernels.blockwise import canonical_tokens

        return canonical_tokens(t, batch, n, padded)

    q_tok = canonical(q_tok, q_len, nq * block_q)
    k_tok = canonical(k_tok, kv_len, nk * block_k)
    mask = None
    if visibility.mask is not None:
        m = np.broadcast_to(np.asarray(visibility.mask), (*batch, heads, q_len, kv_len))
        m = m.reshape(-1, heads, 1, q_len, kv_len)
        m = np.pad(m, [(0, 0)] * 3 + [(0, nq * block_q - q_len), (0, nk * block_k - kv_len)])
        mask = jnp.asarray(m)
    classes = np.asarray(
        _block_classes(
            q_tok,
            k_tok,
            mask,
            block_q=block_q,
            block_k=block_k,
            is_causal=visibility.is_causal,
            window=visibility.window,
        )
    )
    padded = np.zeros((dense.shape[0], heads, nq * block_q, nk * block_k), bool)
    padded[..., :q_len, :kv_len] = dense
    for i in range(nq):
        for j in range(nk):
            block = padded[..., i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            if classes[i, j] == vis.HIDDEN:
                assert not block.any(), f"block {(i, j)} called hidden but has visible pairs"
            if classes[i, j] == vis.FULL:
                assert block.all(), f"block {(i, j)} called full but hides pairs"
    # Whatever is called unreachable sees (or is seen by) nothing.
    q_ok, k_ok = visibility.reachable(kv_heads=heads)
    full = ref.full_mask(batch, heads, q_len, kv_len, **kwargs)  # [*b, h, q, kv]
    if q_ok is not None:
        rows = np.moveaxis(full.any(-1), -1, -2)  # [*b, q, h]
        q_ok = np.broadcast_to(np.asarray(q_ok)[..., 0], rows.shape)
        assert not (rows & ~q_ok).any(), "a query that sees keys was called unreachable"
    if k_ok is not None:
        cols = np.moveaxis(full.any(-2), -1, -2)  # [*b, kv, h]
        k_ok = np.broadcast_to(np.asarray(k_ok)[..., 0], cols.shape)
        assert not (cols & ~k_ok).any(), "a key that is seen was called unreachable"


def test_reachability_is_exact_for_lengths_segments_and_masks():
    visibility = vis.build(
        (2,),
        1,
        4,
        5,
        key_value_seq_lengths=jnp.array([3, 5]),
        query_segment_ids=jnp.array([[1, 1, 2, 2], [1, 1, 1, 1]]),
        key_value_segment_ids=jnp.array([[1, 1, 1, 3, 3], [1, 1, 1, 1, 2]]),
    )
    q_ok, k_ok = visibility.reachable(kv_heads=1)
    # Row 0: queries of segment 2 see no key (no key of segment 2); keys 3, 4 are padding.
    np.testing.assert_array_equal(q_ok[..., 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(k_ok[..., 0, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_positions_not_indices_decide_causality():
    """A KV cache: two sequences with 3 and 5 tokens cached, one new query each."""
    visibility = vis.build(
        (2,),
        1,
        1,
        8,
        is_causal=True,
        local_window_size=(2, 0),
        query_positions=jnp.array([[3], [5]]),
        key_value_seq_lengths=jnp.array([4, 6]),
    )
    mask = np.asarray(visibility.dense_mask())[:, 0, 0]
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]])
    top_left = vis.build((), 1, 2, 4, is_causal=True, causal_alignment="top_left")
    np.testing.assert_array_equal(
        np.asarray(top_left.dense_mask())[0], [[1, 0, 0, 0], [1, 1, 0, 0]]
    )
    bottom_right = vis.build((), 1, 2, 4, is_causal=True)
    np.testing.assert_array_equal(
        np.asarray(bottom_right.dense_mask())[0], [[1, 1, 1, 0], [1, 1, 1, 1]]
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"causal_alignment": "left"}, "causal_alignment"),
        ({"query_positions": jnp.zeros((2, 3), jnp.float32)}, "query_positions"),
        ({"query_positions": jnp.zeros((2, 4), jnp.int32)}, "query_positions"),
        ({"key_value_positions": jnp.zeros((3, 5), jnp.int32)}, "key_value_positions"),
        ({"query_segment_ids": jnp.zeros((2, 3), jnp.int32)}, "key_value_segment_ids"),
        ({"key_value_segment_ids": jnp.zeros((2, 5), jnp.int32)}, "query_segment_ids"),
        ({"key_value_seq_lengths": jnp.zeros((3,), jnp.int32)}, "key_value_seq_lengths"),
        ({"mask": jnp.zeros((3, 5), jnp.float32)}, "mask"),
        ({"local_window_size": (1, -1)}, "local_window_size"),
        ({"is_causal": "yes"}, "is_causal"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=f"'{argument}'"):
        vis.build((2,), 1, 3, 5, **kwargs)


def test_every_query_sees_a_key_and_every_key_is_seen_exactly_when_the_mask_says_so():
    """The static shortcut (no zeroing of empty rows) is never claimed wrongly: checked
    against the dense mask for every small causal / window / alignment combination."""
    windows = [None, (0, 0), (1, 0), (0, 1), (2, 3), (3, 0), (0, 4), (7, 7)]
    for q_len, kv_len, causal, window, alignment in itertools.product(
        [1, 2, 3, 5, 8], [1, 2, 3, 5, 8], [False, True], windows, ["bottom_right", "top_left"]
    ):
        v = vis.build(
            (1,),
            1,
            q_len,
            kv_len,
            is_causal=causal,
            local_window_size=window,
            causal_alignment=alignment,
        )
        mask = v.dense_mask()
        case = (q_len, kv_len, causal, window, alignment)
        truth = mask is None or bool(np.asarray(mask).any(-1).all())
        assert v.every_query_sees_a_key == truth, case
        seen = mask is None or bool(np.asarray(mask).any(-2).all())
        assert v.every_key_is_seen == seen, case
        q_ok, k_ok = v.reachable(kv_heads=1)
        assert (q_ok is None) == truth and (k_ok is None) == seen, case
    padded = vis.build((1,), 1, 4, 4, key_value_seq_lengths=jnp.array([4]))
    assert not padded.every_query_sees_a_key and not padded.every_key_is_seen
