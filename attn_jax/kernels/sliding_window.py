"""Sliding-window (local) attention whose cost is O(N * window), not O(N^2) with a mask.

Queries are processed block by block; each block reads only the band of keys its window
can reach (``block + left + right`` keys), so each step's logits are ``[..., block, band]``
(small enough to stay in cache) instead of ``[..., q_len, kv_len]``. Exact within the
window; gradients by autodiff.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import blockwise
from attn_jax.kernels.blockwise import MASK_VALUE
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["sliding_window_attention"]


@register(
    "sliding_window",
    capabilities=Capabilities(causal=True, window=True, seq_lengths=True, gqa=True),
)
def sliding_window_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | Sequence[int] | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    block_size: int = 64,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """Attention restricted to ``local_window_size=(left, right)`` around each query
    (bottom-right aligned like every kernel here: query ``i`` is centred on key
    ``i + kv_len - q_len``), in time and memory linear in length for a fixed window.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]``.
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias, mask: not supported (a dense ``[q_len, kv_len]`` array would defeat the point);
        passing one raises ``ValueError``.
      local_window_size: ``w`` or ``(left, right)``. Without it every key is in reach and
        this is (exact, quadratic) full attention.
      block_size: queries per block; each block reads ``block_size + left + right`` keys.

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` in the query's dtype (or ``dtype``).
    """
    if bias is not None or mask is not None:
        raise ValueError(
            "sliding_window: arguments 'bias' and 'mask' are not supported; use "
            "local_window_size / is_causal / *_seq_lengths, or the 'flash' kernel"
        )
    c = blockwise.canonicalize(
        query,
        key,
        value,
        None,
        None,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        block_q=block_size,
        block_k=1,
        precision=precision,
        dtype=dtype,
    )
    layout = c.layout
    left, right = layout.window or (layout.kv_len + layout.q_len, layout.kv_len + layout.q_len)
    if layout.is_causal:
        right = min(right, 0)
    left = min(left, layout.kv_len + layout.q_len)  # no wider than the whole sequence
    right = min(right, layout.kv_len + layout.q_len)
    bq, nq = layout.block_q, layout.num_q_blocks
    band = bq + left + right
    # Key j sits at row j + left of the padded keys; query block starting at q0 reads rows
    # [q0 + offset, q0 + offset + band) of them, i.e. keys q0 + offset - left + t.
    pad_front = left + max(0, -layout.offset)
    pad_back = max(0, nq * bq + layout.offset + right + 1 - layout.kv_len) + band
    k = c.key[:, :, : layout.kv_len]
    v = c.value[:, :, : layout.kv_len]
    widths = ((0, 0), (0, 0), (pad_front, pad_back), (0, 0))
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)

    def one_query_block(iq):
        q0 = iq * bq
        q_blk = jax.lax.dynamic_slice_in_dim(c.query, q0, bq, axis=3)  # [b, h, g, bq, d]
        start = q0 + layout.offset - left + pad_front  # >= 0
        k_blk = jax.lax.dynamic_slice_in_dim(k, start, band, axis=2)  # [b, h, band, d]
        v_blk = jax.lax.dynamic_slice_in_dim(v, start, band, axis=2)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk, precision=precision)
        s = s * jnp.float32(layout.scale)
        i = q0 + jnp.arange(bq)[:, None]
        j = start - pad_front + jnp.arange(band)[None, :]  # key index of each band slot
        shifted = i + layout.offset
        visible = (i < layout.q_len) & (j >= 0) & (j < layout.kv_len)
        visible &= (j >= shifted - left) & (j <= shifted + right)
        visible = visible[None, None, None]
        if c.q_lengths is not None:
            visible = visible & (i < c.q_lengths[:, None, None, None, None])
        if c.kv_lengths is not None:
            visible = visible & (j < c.kv_lengths[:, None, None, None, None])
        s = jnp.where(visible, s, MASK_VALUE)
        m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m), 0.0)
        total = p.sum(-1, keepdims=True)
        p = p / jnp.where(total > 0, total, 1.0)
        return jnp.einsum("bhgqk,bhkd->bhgqd", p, v_blk, precision=precision)

    out = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, b, h, g, bq, dv]
    out = jnp.moveaxis(out, 0, 3).reshape(*c.query.shape[:3], nq * bq, -1)
    return blockwise.restore(out, c)
