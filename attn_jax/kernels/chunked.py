"""Memory-efficient attention after Rabe & Staats (2021), "Self-attention does not need
O(n^2) memory".

Queries are processed in chunks; for each query chunk, every key chunk is summarised
(its maximum logit, the sum of exponentials and the exp-weighted values) and the summaries
are combined with a global maximum. Both levels are rematerialised (``jax.checkpoint``),
so the backward pass, derived by autodiff, recomputes chunk summaries instead of storing
them: memory is linear in sequence length for values and gradients. Unlike ``flash`` it
has no custom VJP and visits every key chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import blockwise
from attn_jax.kernels.blockwise import MASK_VALUE, BlockLayout
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["chunked_attention"]


def _attend_query_chunk(
    layout: BlockLayout, q_start, q_chunk, k, v, bias, mask, q_lengths, kv_lengths
):
    """``[b, h, g, chunk_q, dv]`` output of one query chunk."""

    @jax.checkpoint
    def summarize(k_index):
        k_start = k_index * layout.block_k
        k_chunk = jax.lax.dynamic_slice_in_dim(k, k_start, layout.block_k, axis=2)
        v_chunk = jax.lax.dynamic_slice_in_dim(v, k_start, layout.block_k, axis=2)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", q_chunk, k_chunk, precision=layout.precision)
        s = s * jnp.float32(layout.scale)
        bias_chunk = blockwise.block_bias(
            layout, q_start, k_start, blockwise.slice_block(bias, q_start, k_start, layout)
        )
        if bias_chunk is not None:
            s = s + bias_chunk
        visible = blockwise.block_visibility(
            layout,
            q_start,
            k_start,
            q_lengths,
            kv_lengths,
            blockwise.slice_block(mask, q_start, k_start, layout),
        )
        s = jnp.where(visible, s, MASK_VALUE)
        chunk_max = jax.lax.stop_gradient(s.max(-1))
        weights = jnp.where(visible, jnp.exp(s - chunk_max[..., None]), 0.0)
        values = jnp.einsum("bhgqk,bhkd->bhgqd", weights, v_chunk, precision=layout.precision)
        return values, weights.sum(-1), chunk_max

    values, sums, maxima = jax.lax.map(summarize, jnp.arange(layout.num_k_blocks))
    global_max = maxima.max(0)
    factors = jnp.exp(maxima - global_max)
    values = (values * factors[..., None]).sum(0)
    total = (sums * factors).sum(0)
    return values / jnp.where(total > 0, total, 1.0)[..., None]


@register(
    "chunked",
    capabilities=Capabilities(
        mask=True, bias=True, causal=True, window=True, seq_lengths=True, gqa=True
    ),
)
def chunked_attention(
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
    query_chunk_size: int = 1024,
    key_chunk_size: int = 4096,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """Exact attention in query and key chunks (Rabe & Staats), linear memory by
    rematerialisation; same arguments and conventions as
    :func:`attn_jax.kernels.dot_product_attention`, without dropout or returned weights.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]``.
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias, mask: broadcastable to ``[batch..., heads, q_len, kv_len]``.
      query_chunk_size, key_chunk_size: chunk sizes (the paper's defaults: 1024 and 4096;
        clipped to the lengths, which are padded up to whole chunks).

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` in the query's dtype (or ``dtype``).
    """
    c = blockwise.canonicalize(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        block_q=query_chunk_size,
        block_k=key_chunk_size,
        precision=precision,
        dtype=dtype,
    )
    layout = c.layout

    @jax.checkpoint
    def one_query_chunk(q_index):
        q_start = q_index * layout.block_q
        q_chunk = jax.lax.dynamic_slice_in_dim(c.query, q_start, layout.block_q, axis=3)
        return _attend_query_chunk(
            layout, q_start, q_chunk, c.key, c.value, c.bias, c.mask, c.q_lengths, c.kv_lengths
        )

    out = jax.lax.map(one_query_chunk, jnp.arange(layout.num_q_blocks))
    batch, kv_heads, groups = c.query.shape[:3]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, groups, -1, out.shape[-1])
    return blockwise.restore(out, c)
