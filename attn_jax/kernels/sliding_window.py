"""Sliding-window (local) attention whose cost is O(N * window), not O(N^2) with a mask.

Queries are processed block by block; each block gathers only the key blocks that the
visibility model does not hide (for a window ``(left, right)`` with the default positions
at most ``(block + left + right - 1) // block + 2`` of them), so each step's logits are
``[..., block, band]`` instead of ``[..., q_len, kv_len]``. Exact within the window;
gradients by autodiff. Models decode with it from a rolling cache of the last ``left + 1``
positions (memory O(window), not O(max_len)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.kernels import blockwise
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.blockwise import MASK_VALUE
from attn_jax.kernels.registry import TOKEN_VISIBILITY, Capabilities, register

__all__ = ["band_blocks", "sliding_window_attention"]


def band_blocks(call: AttentionCall, block: int, num_k_blocks: int) -> int:
    """How many key blocks a query block can see at most (a static bound): from the window
    when positions are the defaults (consecutive), else every block."""
    window = call.visibility.window
    if window is None or call.visibility.explicit_positions:
        return num_k_blocks
    left, right = window
    if call.visibility.is_causal:
        right = min(right, 0)
    return min(num_k_blocks, (block + left + right - 1) // block + 2)


@register(
    "sliding_window",
    capabilities=Capabilities(**dict.fromkeys(TOKEN_VISIBILITY, True), decode="rolling_cache"),
)
def sliding_window_attention(call: AttentionCall, *, block_size: int = 64) -> AttentionOutput:
    """Attention restricted to ``local_window_size=(left, right)`` around each query's
    position, in time and memory linear in length for a fixed window. Takes no dense
    ``mask`` or ``bias`` (a ``[q_len, kv_len]`` array would defeat the point). Without a
    window every key is in reach and this is (exact, quadratic) full attention.

    Options:
      block_size: queries (and keys) per block.
    """
    c = blockwise.canonicalize(call, block_q=block_size, block_k=block_size)
    layout = c.layout
    plan = blockwise.plan(c)
    band = band_blocks(call, layout.block_q, layout.num_k_blocks)
    order = plan.order[:, :band]  # the hidden blocks past `count` are masked out below
    batch, kv_heads, groups, _, dim = c.query.shape
    bk = layout.block_k
    blocks = lambda x: x.reshape(*x.shape[:2], layout.num_k_blocks, bk, *x.shape[3:])
    keys, values = blocks(c.key), blocks(c.value)  # [b, h, nk, bk, d]
    k_tokens = c.k_tokens.map(lambda x: x.reshape(batch, layout.num_k_blocks, bk))

    def one_query_block(iq):
        q0 = iq * layout.block_q
        q_blk = jax.lax.dynamic_slice_in_dim(c.query, q0, layout.block_q, axis=3)
        chosen = order[iq]  # [band]
        k_blk = keys[:, :, chosen].reshape(batch, kv_heads, band * bk, dim)
        v_blk = values[:, :, chosen].reshape(batch, kv_heads, band * bk, -1)
        k_tok = k_tokens.map(lambda x: x[:, chosen].reshape(batch, band * bk))
        s = blockwise.block_scores(layout, q_blk, k_blk, None)
        visible = blockwise.block_visible(
            layout, blockwise.slice_tokens(c.q_tokens, q0, layout.block_q), k_tok, None
        )
        s = jnp.where(visible, s, MASK_VALUE)
        m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m), 0.0)
        total = p.sum(-1, keepdims=True)
        p = p / jnp.where(total > 0, total, 1.0)
        return jnp.einsum("bhgqk,bhkd->bhgqd", p, v_blk, precision=layout.precision)

    out = jax.lax.map(one_query_block, jnp.arange(layout.num_q_blocks, dtype=jnp.int32))
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, groups, -1, out.shape[-1])
    return AttentionOutput(blockwise.restore(out, c))
