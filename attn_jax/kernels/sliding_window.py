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

# Keys are classified in blocks of 16: the band read per query block is then at most 31
# keys wider than the window needs.
KEY_BLOCK = 16


def band_blocks(call: AttentionCall, block_q: int, block_k: int, num_k_blocks: int) -> int:
    """How many key blocks of ``block_k`` keys a block of ``block_q`` queries can see at
    most (a static bound): from the window when positions are the defaults (consecutive),
    else every block."""
    window = call.visibility.window
    if window is None or call.visibility.explicit_positions:
        return num_k_blocks
    left, right = window
    if call.visibility.is_causal:
        right = min(right, 0)
    return min(num_k_blocks, (block_q + left + right - 1) // block_k + 2)


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
      block_size: queries per block (keys are read in blocks of 16).
    """
    c = blockwise.canonicalize(call, block_q=block_size, block_k=KEY_BLOCK, autodiff=True)
    layout = c.layout
    plan = blockwise.plan(c)
    band = band_blocks(call, layout.block_q, layout.block_k, layout.num_k_blocks)
    # The visible key blocks of a query block lie in `band` consecutive blocks from its
    # first visible one (a band narrower than all blocks needs default positions), so one
    # contiguous slice reads them (a gather would cost a scatter-add in the gradient); the
    # hidden blocks inside it are masked out below.
    width = band * layout.block_k

    def one_query_block(iq):
        q0 = iq * layout.block_q
        q_blk = jax.lax.dynamic_slice_in_dim(c.query, q0, layout.block_q, axis=3)
        first = jnp.minimum(plan.order[iq, 0], layout.num_k_blocks - band) * layout.block_k
        k_blk = jax.lax.dynamic_slice_in_dim(c.key, first, width, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(c.value, first, width, axis=2)
        k_tok = blockwise.slice_tokens(c.k_tokens, first, width)
        s = blockwise.block_scores(layout, q_blk, k_blk, None)
        visible = blockwise.block_visible(
            layout, blockwise.slice_tokens(c.q_tokens, q0, layout.block_q), k_tok, None
        )
        s = jnp.where(visible, s, MASK_VALUE)
        m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m), 0.0)
        total = p.sum(-1, keepdims=True)
        p = p / jnp.where(total > 0, total, 1.0)
        return blockwise.matmul(layout, "bhgqk,bhkd->bhgqd", p, v_blk)

    out = jax.lax.map(one_query_block, jnp.arange(layout.num_q_blocks, dtype=jnp.int32))
    out = jnp.moveaxis(out, 0, 3).reshape(*c.query.shape[:3], -1, out.shape[-1])
    return AttentionOutput(blockwise.restore(out, c))
