"""Flash attention as a Pallas kernel (forward and backward).

Three ``pallas_call`` kernels: the forward pass (one program per query block, online
softmax over key blocks, saves the log-sum-exp), and for the backward pass one kernel for
``dq`` (per query block) and one for ``dk, dv`` (per key block, summing over the query
heads that share it). Each program visits only the blocks the visibility model does not
hide (causal, window, padding, segments: the block plan is computed once per call and
passed in) and evaluates the visibility rule per block from the tokens' positions,
validity and segment ids. Tiles are loaded in their storage dtype (bfloat16 / float16
stay 16-bit, for the tensor cores) and every matmul accumulates in float32, as do the
softmax statistics. On GPU they compile through Triton; elsewhere they run with
``interpret=True`` (the CPU test suite runs them at small sizes that way).

JAX takes no forward-mode derivative of a custom VJP, so ``forward_mode=True`` swaps the
backward kernels for a JVP rule in plain JAX (blockwise, the forward kernel's
log-sum-exp reused), which JAX transposes for reverse mode and differentiates again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attn_jax.kernels import blockwise, checks, softmax_core
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.registry import TOKEN_VISIBILITY, register
from attn_jax.kernels.visibility import Tokens

__all__ = ["pallas_flash_attention"]

MASK_VALUE = softmax_core.MASK_VALUE


@dataclasses.dataclass(frozen=True)
class _Static:
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    groups: int
    kv_heads: int
    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    segments: bool
    interpret: bool
    dtype: Any  # storage dtype of the matmul operands
    precision: Any  # the call's `precision` for every matmul


def _dot(st: _Static, a: jax.Array, b: jax.Array, *, transpose_b: bool = False) -> jax.Array:
    """``a @ b`` (``a @ b.T`` with ``transpose_b``) of 2-D tiles: operands in the storage
    dtype, float32 accumulation, the call's ``precision``."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return jax.lax.dot_general(
        a.astype(st.dtype),
        b.astype(st.dtype),
        dims,
        precision=st.precision,
        preferred_element_type=jnp.float32,
    )


def _tokens(st: _Static, pos, valid, seg) -> Tokens:
    """Tokens from loaded ``[n]`` int32 arrays (validity as 0/1)."""
    return Tokens(pos, valid != 0, seg if st.segments else None)


def _visible(st: _Static, q: Tokens, k: Tokens) -> jax.Array:
    return vis.visible(q, k, is_causal=st.is_causal, window=st.window)


def _forward_kernel(
    plan_ref, q_ref, k_ref, v_ref, qp_ref, qv_ref, qs_ref, kp_ref, kv_ref, ks_ref,
    o_ref, lse_ref, *, st: _Static,
):  # fmt: skip
    q = q_ref[0, 0]  # [bq, d]
    q_tok = _tokens(st, qp_ref[0], qv_ref[0], qs_ref[0])

    def body(t, carry):
        m, total, acc = carry
        j = plan_ref[0, 1 + t]
        rows = pl.ds(j * st.block_k, st.block_k)
        k, v = k_ref[0, rows, :], v_ref[0, rows, :]
        k_tok = _tokens(st, kp_ref[0, rows], kv_ref[0, rows], ks_ref[0, rows])
        visible = _visible(st, q_tok, k_tok)
        s = jnp.where(visible, _dot(st, q, k, transpose_b=True) * st.scale, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        return m_new, total * correction + p.sum(-1), acc * correction[:, None] + _dot(st, p, v)

    init = (
        jnp.full((st.block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((st.block_q,), jnp.float32),
        jnp.zeros((st.block_q, v_ref.shape[-1]), jnp.float32),
    )
    m, total, acc = jax.lax.fori_loop(0, plan_ref[0, 0], body, init)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    o_ref[0, 0] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _dq_kernel(
    plan_ref, q_ref, k_ref, v_ref, qp_ref, qv_ref, qs_ref, kp_ref, kv_ref, ks_ref,
    do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static,
):  # fmt: skip
    q, do = q_ref[0, 0], do_ref[0, 0]
    lse, delta = lse_ref[0, 0], delta_ref[0, 0]
    q_tok = _tokens(st, qp_ref[0], qv_ref[0], qs_ref[0])

    def body(t, dq):
        j = plan_ref[0, 1 + t]
        rows = pl.ds(j * st.block_k, st.block_k)
        k, v = k_ref[0, rows, :], v_ref[0, rows, :]
        k_tok = _tokens(st, kp_ref[0, rows], kv_ref[0, rows], ks_ref[0, rows])
        visible = _visible(st, q_tok, k_tok)
        s = _dot(st, q, k, transpose_b=True) * st.scale
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(st, do, v, transpose_b=True) - delta[:, None])
        return dq + _dot(st, ds, k) * st.scale

    dq = jax.lax.fori_loop(0, plan_ref[0, 0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[0, 0] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    plan_ref, q_ref, k_ref, v_ref, qp_ref, qv_ref, qs_ref, kp_ref, kv_ref, ks_ref,
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: _Static,
):  # fmt: skip
    k, v = k_ref[0], v_ref[0]  # [bk, d], [bk, dv]
    k_tok = _tokens(st, kp_ref[0], kv_ref[0], ks_ref[0])
    count = plan_ref[0, 0]

    def body(index, carry):
        dk, dv = carry
        g, t = index // count, index % count
        i = plan_ref[0, 1 + t]
        rows = pl.ds(i * st.block_q, st.block_q)
        q, do = q_ref[0, g, rows, :], do_ref[0, g, rows, :]
        lse, delta = lse_ref[0, g, rows], delta_ref[0, g, rows]
        q_tok = _tokens(st, qp_ref[0, rows], qv_ref[0, rows], qs_ref[0, rows])
        visible = _visible(st, q_tok, k_tok)
        s = _dot(st, q, k, transpose_b=True) * st.scale
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(st, do, v, transpose_b=True) - delta[:, None])
        return dk + _dot(st, ds.T, q) * st.scale, dv + _dot(st, p.T, do)

    # Every (group, visible query block) pair of this key block.
    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, st.groups * count, body, init)
    dk_ref[0] = dk.astype(dk_ref.dtype)
    dv_ref[0] = dv.astype(dv_ref.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Aux:
    """What the kernels read besides q/k/v: the block plans (``[blocks, 1 + others]``:
    the count of visible blocks, then their indices) and the tokens, ``[B, len]`` int32."""

    plan_q: jax.Array  # per query block: visible key blocks
    plan_k: jax.Array  # per key block: visible query blocks
    q_tokens: tuple[jax.Array, jax.Array, jax.Array]
    k_tokens: tuple[jax.Array, jax.Array, jax.Array]


def _specs(st: _Static, q_pad: int, kv_pad: int, d: int, dv: int):
    """BlockSpecs of the per-query-block grid ``(n, g, i)``: plan row, q-like blocks,
    whole k/v, query token blocks, whole key tokens."""
    by_batch = lambda n: n // st.kv_heads
    plan = pl.BlockSpec((1, _power_of_two(st.num_k_blocks + 1)), lambda n, g, i: (i, 0))
    q_block = pl.BlockSpec((1, 1, st.block_q, d), lambda n, g, i: (n, g, i, 0))
    o_block = pl.BlockSpec((1, 1, st.block_q, dv), lambda n, g, i: (n, g, i, 0))
    row_block = pl.BlockSpec((1, 1, st.block_q), lambda n, g, i: (n, g, i))
    k_whole = pl.BlockSpec((1, kv_pad, d), lambda n, g, i: (n, 0, 0))
    v_whole = pl.BlockSpec((1, kv_pad, dv), lambda n, g, i: (n, 0, 0))
    q_tok = pl.BlockSpec((1, st.block_q), lambda n, g, i: (by_batch(n), i))
    k_tok = pl.BlockSpec((1, kv_pad), lambda n, g, i: (by_batch(n), 0))
    inputs = [plan, q_block, k_whole, v_whole, *[q_tok] * 3, *[k_tok] * 3]
    return inputs, o_block, row_block


def _forward(st: _Static, q, k, v, aux: _Aux):
    n, g, q_pad, d = q.shape
    kv_pad, dv = k.shape[1], v.shape[-1]
    in_specs, o_block, row_block = _specs(st, q_pad, kv_pad, d, dv)
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        out_shape=(_out((n, g, q_pad, dv), q.dtype, q), _out((n, g, q_pad), jnp.float32, q)),
        grid=(n, g, st.num_q_blocks),
        in_specs=in_specs,
        out_specs=[o_block, row_block],
        interpret=st.interpret,
    )(aux.plan_q, q, k, v, *aux.q_tokens, *aux.k_tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, aux):
    return _forward(st, q, k, v, aux)[0]


def _attention_fwd(st, q, k, v, aux):
    out, lse = _forward(st, q, k, v, aux)
    return out, (q, k, v, aux, out, lse)


def _attention_bwd(st, residuals, d_out):
    q, k, v, aux, out, lse = residuals
    n, g, q_pad, d = q.shape
    kv_pad, dv = k.shape[1], v.shape[-1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    in_specs, o_block, row_block = _specs(st, q_pad, kv_pad, d, dv)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        out_shape=_out(q.shape, q.dtype, q),
        grid=(n, g, st.num_q_blocks),
        in_specs=[*in_specs, o_block, row_block, row_block],
        out_specs=in_specs[1],
        interpret=st.interpret,
    )(aux.plan_q, q, k, v, *aux.q_tokens, *aux.k_tokens, d_out, lse, delta)
    by_batch = lambda n: n // st.kv_heads
    whole = lambda *shape: pl.BlockSpec((1, *shape), lambda n, j: (n,) + (0,) * len(shape))
    k_block = pl.BlockSpec((1, st.block_k, d), lambda n, j: (n, j, 0))
    v_block = pl.BlockSpec((1, st.block_k, dv), lambda n, j: (n, j, 0))
    q_tok = pl.BlockSpec((1, q_pad), lambda n, j: (by_batch(n), 0))
    k_tok = pl.BlockSpec((1, st.block_k), lambda n, j: (by_batch(n), j))
    plan = pl.BlockSpec((1, _power_of_two(st.num_q_blocks + 1)), lambda n, j: (j, 0))
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        out_shape=(_out(k.shape, k.dtype, k), _out(v.shape, v.dtype, v)),
        grid=(n, st.num_k_blocks),
        in_specs=[
            plan,
            whole(g, q_pad, d),
            k_block,
            v_block,
            *[q_tok] * 3,
            *[k_tok] * 3,
            whole(g, q_pad, dv),
            whole(g, q_pad),
            whole(g, q_pad),
        ],
        out_specs=[k_block, v_block],
        interpret=st.interpret,
    )(aux.plan_k, q, k, v, *aux.q_tokens, *aux.k_tokens, d_out, lse, delta)
    return dq, dk, dv_, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _tangent_terms(st: _Static, q, k, v, aux: _Aux, lse, tq, tk, tv):
    """The JVP's key-block sums in plain JAX, linear in the tangents ``tq, tk, tv``:
    ``(sum_j p (ds v + dv) [n, g, q_pad, dv], sum_j p ds [n, g, q_pad])`` with ``p = exp(s -
    lse)`` and ``ds`` the scores' tangent, over the key blocks of each query block's plan
    (a static loop over all of them, so that JAX can transpose it; blocks rematerialised)."""
    n, g, q_pad, _ = q.shape
    expand = lambda x: jnp.repeat(x, st.kv_heads, axis=0)  # [B, len] -> [n, len]
    q_ints, k_ints = [expand(x) for x in aux.q_tokens], [expand(x) for x in aux.k_tokens]
    dot = lambda spec, a, b: jnp.einsum(
        spec,
        a.astype(st.dtype),
        b.astype(st.dtype),
        precision=st.precision,
        preferred_element_type=jnp.float32,
    )

    @jax.checkpoint
    def one_query_block(iq, q, k, v, tq, tk, tv, lse):
        rows = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, iq * st.block_q, st.block_q, axis)
        q_blk, tq_blk, lse_blk = rows(q, 2), rows(tq, 2), rows(lse, 2)
        q_tok = _tokens(st, *[rows(x, 1)[:, None, :] for x in q_ints])  # [n, 1, bq]
        plan = aux.plan_q[iq]

        @jax.checkpoint
        def block(acc, k_blk, v_blk, tk_blk, tv_blk, k_ints_blk):
            k_tok = _tokens(st, *[x[:, None, :] for x in k_ints_blk])
            s = dot("ngqd,nkd->ngqk", q_blk, k_blk) * st.scale
            p = jnp.where(_visible(st, q_tok, k_tok), jnp.exp(s - lse_blk[..., None]), 0.0)
            ds = dot("ngqd,nkd->ngqk", tq_blk, k_blk) + dot("ngqd,nkd->ngqk", q_blk, tk_blk)
            p_ds = p * ds * st.scale
            values = dot("ngqk,nkd->ngqd", p_ds, v_blk) + dot("ngqk,nkd->ngqd", p, tv_blk)
            return acc[0] + values, acc[1] + p_ds.sum(-1)

        def body(t, acc):
            # Block-sized operands (sliced outside the cond): what reverse mode saves per
            # step is then a block, not the whole keys.
            start = plan[1 + t] * st.block_k
            cols = lambda x: jax.lax.dynamic_slice_in_dim(x, start, st.block_k, 1)
            blocks = (cols(k), cols(v), cols(tk), cols(tv), [cols(x) for x in k_ints])
            skip = lambda acc, *blocks: acc
            return jax.lax.cond(t < plan[0], block, skip, acc, *blocks)

        init = (jnp.zeros((n, g, st.block_q, v.shape[-1]), jnp.float32), jnp.zeros_like(lse_blk))
        return jax.lax.fori_loop(0, st.num_k_blocks, body, init)

    blocks = jnp.arange(st.num_q_blocks, dtype=jnp.int32)
    t_values, t_lse = jax.lax.map(lambda iq: one_query_block(iq, q, k, v, tq, tk, tv, lse), blocks)
    by_rows = lambda x: jnp.moveaxis(x, 0, 2).reshape(n, g, q_pad, *x.shape[4:])
    return by_rows(t_values), by_rows(t_lse)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attention_by_jvp(st: _Static, q, k, v, aux):
    """``(out, lse)`` from the Pallas forward kernel, derivatives from :func:`_tangent_terms`
    (forward mode, its transpose for reverse mode, and higher orders)."""
    return _forward(st, q, k, v, aux)


@_attention_by_jvp.defjvp
def _attention_by_jvp_rule(st: _Static, primals, tangents):
    q, k, v, aux = primals
    tq, tk, tv, _ = tangents
    out, lse = _attention_by_jvp(st, q, k, v, aux)  # itself: differentiable again
    t_values, t_lse = _tangent_terms(st, q, k, v, aux, lse, tq, tk, tv)
    t_out = t_values - t_lse[..., None] * out.astype(jnp.float32)
    return (out, lse), (t_out.astype(out.dtype), t_lse)


def _out(shape: tuple[int, ...], dtype: Any, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output type that varies over the same ``shard_map`` axes as ``like``."""
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=getattr(jax.typeof(like), "manual_axis_type", None)
    )


def _plan_rows(order: jax.Array, count: jax.Array) -> jax.Array:
    """``[blocks, 1 + others]`` int32: the count, then the visible blocks' indices (rows
    padded to a power of two: Triton's block shapes)."""
    rows = jnp.concatenate([count[:, None], order], axis=1).astype(jnp.int32)
    return blockwise.pad_to(rows, 1, _power_of_two(rows.shape[1]))


def _power_of_two(x: int, least: int = 1) -> int:
    return max(least, 1 << max(0, x - 1).bit_length())


@register("pallas_flash", capabilities=TOKEN_VISIBILITY)
def pallas_flash_attention(
    call: AttentionCall,
    *,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool | None = None,
    forward_mode: bool = False,
) -> AttentionOutput:
    """Flash attention in Pallas: exact, memory linear in length, forward and backward.
    No dense ``mask`` or ``bias`` (use ``flash``), no dropout or returned weights.

    Options:
      block_q, block_k: block sizes (clipped to the lengths rounded up to a power of two
        >= 16); on GPU they must be powers of two >= 16 (Triton's tiles).
      interpret: run the kernels in the Pallas interpreter (default: when the backend is
        not a GPU).
      forward_mode: derivatives from a JVP rule in plain JAX (blockwise, memory linear in
        length) instead of the Pallas backward kernels, so that ``jax.jvp``,
        ``jax.jacfwd`` and Hessian-vector products work; reverse mode is then that JVP's
        transpose (XLA), not the Pallas backward. The default (a custom VJP, whose
        derivatives JAX cannot take in forward mode) keeps the Pallas backward.
    """
    checks.check_same_dtype(call.query, call.key, call.value)
    checks.check_block_sizes(block_q=block_q, block_k=block_k)
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    if not interpret:
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if size < 16 or size & (size - 1):
                checks.fail(name, f"must be a power of two >= 16 on GPU (Triton), got {size}")
    query, key, value = call.safe_inputs()
    batch_shape = call.batch_shape
    q_len, heads, d = query.shape[-3:]
    kv_len, kv_heads = key.shape[-3:-1]
    groups = heads // kv_heads
    batch = math.prod(batch_shape)
    bq = min(block_q, _power_of_two(q_len, 16))
    bk = min(block_k, _power_of_two(kv_len, 16))
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    q_tok, k_tok = call.visibility.tokens()
    q_tok = blockwise.canonical_tokens(q_tok, batch_shape, q_len, nq * bq)
    k_tok = blockwise.canonical_tokens(k_tok, batch_shape, kv_len, nk * bk)
    classes = vis.block_classes(
        q_tok,
        k_tok,
        None,
        block_q=bq,
        block_k=bk,
        is_causal=call.visibility.is_causal,
        window=call.visibility.window,
    )

    def as_ints(t: Tokens):
        zeros = jnp.zeros_like(t.positions)
        segments = zeros if t.segment_ids is None else t.segment_ids
        return t.positions, t.valid.astype(jnp.int32), segments

    aux = _Aux(
        _plan_rows(*vis.visible_blocks(classes)),
        _plan_rows(*vis.visible_blocks(classes.T)),
        as_ints(q_tok),
        as_ints(k_tok),
    )
    st = _Static(
        block_q=bq,
        block_k=bk,
        num_q_blocks=nq,
        num_k_blocks=nk,
        groups=groups,
        kv_heads=kv_heads,
        scale=call.scale,
        is_causal=call.visibility.is_causal,
        window=call.visibility.window,
        segments=call.visibility.query_segment_ids is not None,
        interpret=interpret,
        dtype=blockwise.storage_dtype(query, key, value),
        precision=call.precision,
    )
    # Head dims zero-padded to a power of two >= 16 (Triton's tiles; q . k is unchanged,
    # the padded value columns are sliced off).
    dv = value.shape[-1]
    d_pad, dv_pad = _power_of_two(d, 16), _power_of_two(dv, 16)
    query, key = blockwise.pad_to(query, -1, d_pad), blockwise.pad_to(key, -1, d_pad)
    value = blockwise.pad_to(value, -1, dv_pad)
    d = d_pad
    # [batch..., len, heads, d] -> [batch * kv_heads, groups, len, d]
    q = query.reshape(batch, q_len, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    q = blockwise.pad_to(q.reshape(batch * kv_heads, groups, q_len, d), 2, nq * bq)
    k = key.reshape(batch, kv_len, kv_heads, d).transpose(0, 2, 1, 3)
    k = blockwise.pad_to(k.reshape(batch * kv_heads, kv_len, d), 1, nk * bk)
    v = value.reshape(batch, kv_len, kv_heads, -1).transpose(0, 2, 1, 3)
    v = blockwise.pad_to(v.reshape(batch * kv_heads, kv_len, -1), 1, nk * bk)
    out = _attention_by_jvp(st, q, k, v, aux)[0] if forward_mode else _attention(st, q, k, v, aux)
    out = out[:, :, :q_len, :dv]
    out = out.reshape(batch, kv_heads, groups, q_len, -1).transpose(0, 3, 1, 2, 4)
    return AttentionOutput(out.reshape(*batch_shape, q_len, heads, -1).astype(call.out_dtype))
