"""Boolean attention masks. ``True`` means "may attend".

Masks broadcast against attention logits ``[batch..., heads, q_len, kv_len]``. Positional
masks (causal, window) are aligned **bottom-right**: query ``i`` of ``q_len`` sits at key
position ``i + (kv_len - q_len)``, which is what decoding with a KV cache needs. They are
the dense form of the kernels' visibility rule (:func:`attn_jax.kernels.visibility.visible`),
for code that wants the arrays; the kernels themselves take the arguments
(``is_causal``, ``local_window_size``, segment ids, ...) and never need them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.kernels.visibility import Tokens, visible

__all__ = [
    "causal_mask",
    "combine_masks",
    "lengths_to_mask",
    "padding_mask",
    "segment_mask",
    "window_mask",
]


def _positional(
    q_len: int, kv_len: int, offset: int | None, *, is_causal: bool, window=None
) -> jax.Array:
    """``[q_len, kv_len]``: the rule with query ``i`` at position ``i + offset`` (default
    ``kv_len - q_len``: bottom-right) and key ``j`` at ``j``."""
    if offset is None:
        offset = kv_len - q_len
    q = Tokens(jnp.arange(q_len, dtype=jnp.int32) + offset)
    k = Tokens(jnp.arange(kv_len, dtype=jnp.int32))
    return visible(q, k, is_causal=is_causal, window=window)


def causal_mask(q_len: int, kv_len: int | None = None, *, offset: int | None = None) -> jax.Array:
    """``[q_len, kv_len]`` mask: query ``i`` sees keys ``j <= i + offset``.

    ``kv_len`` defaults to ``q_len``; ``offset`` defaults to ``kv_len - q_len`` (bottom-right
    alignment); ``offset=0`` gives flax's top-left alignment.
    """
    kv_len = q_len if kv_len is None else kv_len
    return _positional(q_len, kv_len, offset, is_causal=True)


def window_mask(
    q_len: int, kv_len: int, left: int, right: int, *, offset: int | None = None
) -> jax.Array:
    """``[q_len, kv_len]`` mask: query ``i`` sees keys ``i + offset - left <= j <= i + offset
    + right`` (bottom-right alignment by default, like :func:`causal_mask`)."""
    return _positional(q_len, kv_len, offset, is_causal=False, window=(left, right))


def lengths_to_mask(lengths: jax.Array, max_len: int) -> jax.Array:
    """``lengths [batch...]`` -> ``[batch..., max_len]`` mask, ``True`` at positions < length."""
    return jnp.arange(max_len) < jnp.asarray(lengths)[..., None]


def padding_mask(
    key_lengths: jax.Array | None,
    kv_len: int,
    *,
    query_lengths: jax.Array | None = None,
    q_len: int | None = None,
) -> jax.Array:
    """Padding mask from per-example valid lengths ``[batch...]``.

    Args:
      key_lengths: valid key/value lengths ``[batch...]`` (``None``: all valid).
      kv_len: padded key length.
      query_lengths: valid query lengths ``[batch...]``; padded query rows see nothing.
      q_len: padded query length (required with ``query_lengths``).

    Returns:
      ``[batch..., 1, 1, kv_len]`` (keys only) or ``[batch..., 1, q_len, kv_len]``.
    """
    k_valid = (
        jnp.ones((kv_len,), bool) if key_lengths is None else lengths_to_mask(key_lengths, kv_len)
    )
    if query_lengths is None:
        return k_valid[..., None, None, :]
    if q_len is None:
        raise ValueError("padding_mask: argument 'q_len' is required with 'query_lengths'")
    q_valid = lengths_to_mask(query_lengths, q_len)
    return (q_valid[..., :, None] & k_valid[..., None, :])[..., None, :, :]


def segment_mask(
    query_segment_ids: jax.Array, key_segment_ids: jax.Array | None = None
) -> jax.Array:
    """``[batch..., 1, q_len, kv_len]`` mask: tokens attend within their own segment.

    Args:
      query_segment_ids: ``[batch..., q_len]`` integer segment ids.
      key_segment_ids: ``[batch..., kv_len]``; defaults to ``query_segment_ids``.
    """
    query_segment_ids = jnp.asarray(query_segment_ids)
    key_segment_ids = query_segment_ids if key_segment_ids is None else jnp.asarray(key_segment_ids)
    q = Tokens(jnp.zeros_like(query_segment_ids), segment_ids=query_segment_ids)
    k = Tokens(jnp.zeros_like(key_segment_ids), segment_ids=key_segment_ids)
    return visible(q, k, is_causal=False, window=None)[..., None, :, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks with broadcasting; ``None`` entries are skipped.

    Returns ``None`` when every mask is ``None``.
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out
