"""Flash-style attention: blockwise online softmax with a custom JVP (pure JAX).

The forward pass walks, for each query block, only the key blocks that the visibility
model (causal, window, padding, segments, a dense mask, ``mask_fn``) does not hide,
keeping a running maximum, sum and weighted value sum, and saves only the output and the
log-sum-exp per query. Blocks shown entirely skip the mask evaluation.

Derivatives come from one rule, the JVP (:func:`tangent_terms`): a second blockwise pass that
recomputes each block's weights from the log-sum-exp and is linear in the tangents. JAX
transposes it for reverse mode (the backward pass: the same blocks, weights recomputed,
nothing ``q_len x kv_len`` stored) and differentiates it again for higher orders, so
``jax.grad``, ``jax.jvp``, ``jax.jacfwd`` and Hessian-vector products all work with memory
linear in sequence length. Score functions, the soft cap, sinks and fused dropout (its keep
mask regenerated from the key and the block coordinates) live inside the same blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attn_jax.kernels import blockwise
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.blockwise import BlockLayout
from attn_jax.kernels.registry import BLOCKWISE_FEATURES, register
from attn_jax.kernels.visibility import Tokens

__all__ = ["flash_attention"]


def _key_block(x: jax.Array, index, layout: BlockLayout) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, index * layout.block_k, layout.block_k, axis=2)


def _query_block(x: jax.Array, index, layout: BlockLayout, axis: int = 3) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, index * layout.block_q, layout.block_q, axis=axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Block:
    """Block ``(iq, jk)``'s slices: queries, keys, values, bias (or ``None``), tokens and
    the dense mask's block (or ``None``)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    q_tok: Tokens
    k_tok: Tokens
    mask: jax.Array | None


def _slices(layout: BlockLayout, q, k, v, bias, aux, iq, jk) -> _Block:
    mask, q_tok, k_tok = aux[0], aux[1], aux[2]
    q0, k0 = iq * layout.block_q, jk * layout.block_k
    return _Block(
        _query_block(q, iq, layout),
        _key_block(k, jk, layout),
        _key_block(v, jk, layout),
        blockwise.slice_block(bias, q0, k0, layout),
        blockwise.slice_tokens(q_tok, q0, layout.block_q),
        blockwise.slice_tokens(k_tok, k0, layout.block_k),
        blockwise.slice_block(mask, q0, k0, layout),
    )


def _logits_fn(layout: BlockLayout, blk: _Block):
    """The block's logits as a function of its differentiable inputs."""

    def logits_of(q_blk, k_blk, bias_blk, consts):
        return blockwise.block_logits(layout, q_blk, k_blk, bias_blk, blk.q_tok, blk.k_tok, consts)

    return logits_of


def _shown(layout: BlockLayout, blk: _Block, aux, partial: bool):
    """The block's visibility (``None`` for a block shown entirely)."""
    if not partial:
        return None
    return blockwise.block_visible(layout, blk.q_tok, blk.k_tok, blk.mask, aux[4])


def _by_class(plan, iq, jk, fn, *args):
    """``fn(partial, *args)``: without the mask for blocks shown entirely."""
    return jax.lax.cond(
        plan.classes[iq, jk] == vis.FULL,
        functools.partial(fn, False),
        functools.partial(fn, True),
        *args,
    )


def fold_query_block(layout: BlockLayout, q, k, v, bias, consts, aux, iq, carry):
    """Folds the key blocks of query block ``iq`` that the plan (``aux[3]``) does not hide
    into its running softmax ``carry`` (``(max, total, acc)`` of ``[b, h, g, block_q]``)."""
    plan = aux[3]

    def update(partial, carry, jk):
        blk = _slices(layout, q, k, v, bias, aux, iq, jk)
        s = _logits_fn(layout, blk)(blk.q, blk.k, blk.bias, consts)
        keep = blockwise.block_keep(layout, aux[5], blk.q_tok, blk.k_tok)
        shown = _shown(layout, blk, aux, partial)
        return blockwise.online_softmax_update(layout, carry, s, shown, blk.v, keep)

    def body(t, carry):
        jk = plan.order[iq, t]
        return _by_class(plan, iq, jk, update, carry, jk)

    return jax.lax.fori_loop(0, plan.count[iq], body, carry)


def _forward(layout: BlockLayout, q, k, v, bias, sinks, consts, aux):
    """``(out [b, h, g, q_pad, dv], lse [b, h, g, q_pad])``."""
    batch, kv_heads, groups, _, _ = q.shape
    dv = v.shape[-1]

    def one_query_block(iq):
        stats = (batch, kv_heads, groups, layout.block_q)
        init = blockwise.online_softmax_init(stats, dv, sinks, q, k, v, bias)
        carry = fold_query_block(layout, q, k, v, bias, consts, aux, iq, init)
        return blockwise.online_softmax_result(*carry)

    out, lse = jax.lax.map(one_query_block, jnp.arange(layout.num_q_blocks, dtype=jnp.int32))
    return _rows(out, q.shape), _rows(lse, q.shape)


def _rows(x: jax.Array, q_shape: tuple[int, ...]) -> jax.Array:
    """``[nq, b, h, g, bq, ...]`` per query block -> ``[b, h, g, nq * bq, ...]``."""
    return jnp.moveaxis(x, 0, 3).reshape(*q_shape[:3], -1, *x.shape[5:])


def tangent_terms(layout: BlockLayout, primals, tangents, lse):
    """The key-block sums of the JVP, linear in ``tangents`` (of ``q, k, v, bias, consts``):
    ``(sum_j p z (ds v + dv) [b, h, g, q_pad, dv], sum_j p ds [b, h, g, q_pad])`` over the
    blocks the plan does not hide, where ``p = exp(s - lse)`` are the weights, ``z`` the
    dropout keep mask (0 or 1: ``1 / (1 - rate)`` scales the output later) and ``ds`` the
    logits' tangent.

    Query blocks and blocks are rematerialised, so the transpose (reverse mode) recomputes
    the weights from block-sized inputs instead of storing them.
    """
    q, k, v, bias, consts, aux = primals
    tq, tk, tv, tbias, tconsts = tangents
    plan = aux[3]
    dv = v.shape[-1]

    @functools.partial(jax.checkpoint, static_argnums=(0,))
    def terms(partial, blk, t_blk, consts, t_consts, lse_blk):
        s, ds = jax.jvp(
            _logits_fn(layout, blk), (blk.q, blk.k, blk.bias, consts), (*t_blk[:3], t_consts)
        )
        shown = _shown(layout, blk, aux, partial)
        if shown is not None:
            s = jnp.where(shown, s, blockwise.MASK_VALUE)
        p = jnp.exp(s - lse_blk[..., None])
        if shown is not None:
            p = jnp.where(shown, p, 0.0)
        keep = blockwise.block_keep(layout, aux[5], blk.q_tok, blk.k_tok)
        applied = blockwise.dropped(p, keep)
        mm = functools.partial(blockwise.linear_matmul, layout, "bhgqk,bhkd->bhgqd")
        return mm(applied * ds, blk.v) + mm(applied, t_blk[3]), (p * ds).sum(-1)

    @jax.checkpoint
    def one_query_block(iq, q, k, v, bias, consts, tq, tk, tv, tbias, tconsts, lse):
        lse_blk = _query_block(lse, iq, layout)

        def body(t, acc):
            jk = plan.order[iq, t]
            blk = _slices(layout, q, k, v, bias, aux, iq, jk)
            t_all = _slices(layout, tq, tk, tv, tbias, aux, iq, jk)
            t_blk = (t_all.q, t_all.k, t_all.bias, t_all.v)

            def visible_block(acc, blk, t_blk):
                t_values, t_lse = _by_class(
                    plan, iq, jk, terms, blk, t_blk, consts, tconsts, lse_blk
                )
                return acc[0] + t_values, acc[1] + t_lse

            skip = lambda acc, blk, t_blk: acc
            return jax.lax.cond(t < plan.count[iq], visible_block, skip, acc, blk, t_blk)

        stats = (*q.shape[:3], layout.block_q)
        zeros = blockwise.zeros_like_inputs(stats, q, k, tq, tk)
        init = (jnp.zeros((*stats, dv), jnp.float32) + zeros[..., None], zeros)
        return jax.lax.fori_loop(0, layout.num_k_blocks, body, init)

    t_values, t_lse = jax.lax.map(
        lambda iq: one_query_block(iq, q, k, v, bias, consts, tq, tk, tv, tbias, tconsts, lse),
        jnp.arange(layout.num_q_blocks, dtype=jnp.int32),
    )
    return _rows(t_values, q.shape), _rows(t_lse, q.shape)


def combine_tangent(t_values, t_lse, sinks, t_sinks, out, lse):
    """The JVP of ``(out, lse)`` from the key-block sums of :func:`tangent_terms`: ``dlse =
    sum_j p ds + p_sink dsink`` and ``dout = sum_j p z (ds v + dv) - dlse * out``."""
    if sinks is not None:
        t_lse = t_lse + jnp.exp(sinks - lse) * t_sinks
    return t_values - t_lse[..., None] * out, t_lse


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(layout: BlockLayout, q, k, v, bias, sinks, consts, aux):
    return _forward(layout, q, k, v, bias, sinks, consts, aux)


@_flash.defjvp
def _flash_jvp(layout: BlockLayout, primals, tangents):
    q, k, v, bias, sinks, consts, aux = primals
    tq, tk, tv, tbias, t_sinks, t_consts = tangents[:6]
    out, lse = _forward(layout, *primals)
    t_values, t_lse = tangent_terms(
        layout, (q, k, v, bias, consts, aux), (tq, tk, tv, tbias, t_consts), lse
    )
    return (out, lse), combine_tangent(t_values, t_lse, sinks, t_sinks, out, lse)


@register("flash", capabilities=BLOCKWISE_FEATURES)
def flash_attention(
    call: AttentionCall, *, block_q: int = 512, block_k: int = 256
) -> AttentionOutput:
    """Exact attention in blocks, memory linear in sequence length (forward, backward and
    forward-mode AD), skipping every block the visibility model or ``mask_fn`` hides; fused
    dropout; no returned weights (``return_attention_mass`` gives their column sums).

    Options:
      block_q, block_k: block sizes (clipped to the lengths; lengths are padded up). The
        defaults were the fastest on a 2-core CPU at N=4096, head_dim 64.
    """
    c = blockwise.canonicalize(call, block_q=block_q, block_k=block_k, autodiff=True)
    plan = blockwise.plan(c)
    aux = (c.mask, c.q_tokens, c.k_tokens, plan, c.mask_consts, c.seed)
    out, lse = _flash(c.layout, c.query, c.key, c.value, c.bias, c.sinks, c.score_consts, aux)
    residual = blockwise.restore_lse(lse, c) if call.return_residual else None
    mass = None
    if call.return_attention_mass:
        mass = blockwise.restore_mass(blockwise.key_mass(c, plan, lse), c)
    return AttentionOutput(blockwise.restore(out, c), residual, mass=mass)
