"""Memory-efficient attention after Rabe & Staats (2021), "Self-attention does not need
O(n^2) memory".

Queries are processed in chunks; for each query chunk, every key chunk is summarised
(its maximum logit, the sum of exponentials and the exp-weighted values) and the summaries
are combined with a global maximum. Both levels are rematerialised (``jax.checkpoint``),
so the backward pass, derived by autodiff, recomputes chunk summaries instead of storing
them: memory is linear in sequence length for values and gradients. Chunks the visibility
model hides are not computed (their summary is empty) when there can be any; unlike
``flash`` it has no custom VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.kernels import blockwise
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.blockwise import MASK_VALUE, Canonical, Plan
from attn_jax.kernels.registry import BLOCKWISE_FEATURES, register

__all__ = ["chunked_attention"]


def _attend_query_chunk(c: Canonical, plan: Plan | None, iq: jax.Array, consts):
    """``([b, h, g, chunk_q, dv] output, [b, h, g, chunk_q] log-sum-exp)`` of query chunk
    ``iq`` (``plan``: ``None`` computes every key chunk)."""
    layout = c.layout
    q_start = iq * layout.block_q
    q_chunk = jax.lax.dynamic_slice_in_dim(c.query, q_start, layout.block_q, axis=3)
    q_tok = blockwise.slice_tokens(c.q_tokens, q_start, layout.block_q)
    batch, heads, groups = q_chunk.shape[:3]
    dv = c.value.shape[-1]

    @jax.checkpoint
    def summarize(k_index):
        k_start = k_index * layout.block_k
        k_chunk = jax.lax.dynamic_slice_in_dim(c.key, k_start, layout.block_k, axis=2)
        v_chunk = jax.lax.dynamic_slice_in_dim(c.value, k_start, layout.block_k, axis=2)

        def summary():
            k_tok = blockwise.slice_tokens(c.k_tokens, k_start, layout.block_k)
            bias = blockwise.slice_block(c.bias, q_start, k_start, layout)
            s = blockwise.block_logits(
                layout, q_chunk, k_chunk, bias, q_tok, k_tok, consts, autodiff=True
            )
            visible = blockwise.block_visible(
                layout,
                q_tok,
                k_tok,
                blockwise.slice_block(c.mask, q_start, k_start, layout),
                c.mask_consts,
            )
            s = jnp.where(visible, s, MASK_VALUE)
            chunk_max = jax.lax.stop_gradient(s.max(-1))
            weights = jnp.where(visible, jnp.exp(s - chunk_max[..., None]), 0.0)
            keep = blockwise.block_keep(layout, c.seed, q_tok, k_tok)
            values = blockwise.matmul(
                layout, "bhgqk,bhkd->bhgqd", blockwise.dropped(weights, keep), v_chunk
            )
            return values, weights.sum(-1), chunk_max

        def hidden():
            stats = (batch, heads, groups, layout.block_q)
            zeros = blockwise.zeros_like_inputs(stats, q_chunk, k_chunk)
            values = jnp.zeros((*stats, dv), jnp.float32) + zeros[..., None]
            return values, zeros, zeros + MASK_VALUE

        if plan is None:
            return summary()
        return jax.lax.cond(plan.classes[iq, k_index] == vis.HIDDEN, hidden, summary)

    values, sums, maxima = jax.lax.map(summarize, jnp.arange(layout.num_k_blocks, dtype=jnp.int32))
    global_max = maxima.max(0)
    sinks = None if c.sinks is None else jnp.broadcast_to(c.sinks, global_max.shape)
    if sinks is not None:  # the sink: one more logit, weight exp(sink - max), no value
        global_max = jnp.maximum(global_max, jax.lax.stop_gradient(sinks))
    factors = jnp.exp(maxima - global_max[None])
    # The chunks' summaries are added one by one, not as one product-then-sum over the
    # chunk axis: under vmap, `(values * factors).sum(0)` becomes a rank-7 multiply-reduce
    # with a size-1 dimension, which XLA:CPU's "ynn" fusion in jaxlib 0.10.2 turns into a
    # segmentation fault (jax-ml/jax#40412; `x = jnp.ones((2, 2, 1, 2, 2, 16, 16))`,
    # `jax.jit(lambda x, w: (x * w[..., None]).sum(1))(x, x[..., 0])` crashes alone).
    chunks = range(layout.num_k_blocks)
    values = sum(values[i] * factors[i][..., None] for i in chunks)
    total = sum(sums[i] * factors[i] for i in chunks)
    if sinks is not None:
        total = total + jnp.exp(sinks - global_max)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return values / safe[..., None], jnp.where(seen, global_max + jnp.log(safe), 0.0)


@register("chunked", capabilities=BLOCKWISE_FEATURES)
def chunked_attention(
    call: AttentionCall, *, query_chunk_size: int = 1024, key_chunk_size: int = 4096
) -> AttentionOutput:
    """Exact attention in query and key chunks (Rabe & Staats), linear memory by
    rematerialisation; fused dropout; no returned weights (``return_attention_mass`` gives
    their column sums).

    Options:
      query_chunk_size, key_chunk_size: chunk sizes (the paper's defaults: 1024 and 4096;
        clipped to the lengths, which are padded up to whole chunks).
    """
    c = blockwise.canonicalize(
        call, block_q=query_chunk_size, block_k=key_chunk_size, autodiff=True
    )
    # Skipping takes a `cond`, which blocks XLA's fusion across it (measured at N = 4,096:
    # 1.5x slower and 1.4x the gradient scratch when nothing can be skipped), so it is used
    # only where a key chunk can be hidden: a restricting visibility and several key chunks.
    restricts = call.visibility.restricts or call.mask_fn is not None
    skips = restricts and c.layout.num_k_blocks > 1
    plan = blockwise.plan(c) if skips else None
    one_query_chunk = jax.checkpoint(lambda iq, consts: _attend_query_chunk(c, plan, iq, consts))
    out, lse = jax.lax.map(
        lambda iq: one_query_chunk(iq, c.score_consts),
        jnp.arange(c.layout.num_q_blocks, dtype=jnp.int32),
    )
    batch, kv_heads, groups = c.query.shape[:3]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, groups, -1, out.shape[-1])
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, kv_heads, groups, -1)
    residual = blockwise.restore_lse(lse, c) if call.return_residual else None
    mass = None
    if call.return_attention_mass:
        plan = plan if plan is not None else blockwise.plan(c)
        mass = blockwise.restore_mass(blockwise.key_mass(c, plan, lse), c)
    return AttentionOutput(blockwise.restore(out, c), residual, mass=mass)
