"""Flash attention as a Pallas kernel (forward and backward).

Three ``pallas_call`` kernels: the forward pass (one program per query block, online
softmax over key blocks, saves the log-sum-exp), and for the backward pass one kernel for
``dq`` (per query block) and one for ``dk, dv`` (per key block, summing over the query
heads that share it). On GPU they compile through Triton; elsewhere they run with
``interpret=True`` (the CPU test suite runs them at small sizes that way). Causal key
blocks above the diagonal are skipped.
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
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["pallas_flash_attention"]

MASK_VALUE = softmax_core.MASK_VALUE


@dataclasses.dataclass(frozen=True)
class _Static:
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    groups: int
    scale: float
    is_causal: bool
    interpret: bool

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len


def _visible(st: _Static, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """``[block_q, block_k]``: real keys, and bottom-right causal when asked."""
    ok = (k_pos[None, :] < st.kv_len) & (q_pos[:, None] < st.q_len)
    if st.is_causal:
        ok &= k_pos[None, :] <= q_pos[:, None] + st.offset
    return ok


def _key_blocks_for(st: _Static, q_block: jax.Array) -> jax.Array:
    """How many key blocks query block ``q_block`` can see (causal skipping)."""
    if not st.is_causal:
        return st.num_k_blocks
    last = jnp.minimum((q_block + 1) * st.block_q, st.q_len) - 1 + st.offset
    return jnp.clip(last // st.block_k + 1, 0, st.num_k_blocks)


def _first_query_block(st: _Static, k_block: jax.Array) -> jax.Array:
    """The first query block that sees key block ``k_block`` (causal skipping)."""
    if not st.is_causal:
        return 0
    return jnp.clip((k_block * st.block_k - st.offset) // st.block_q, 0, st.num_q_blocks)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
    i = pl.program_id(2)
    q = q_ref[0, 0].astype(jnp.float32)  # [bq, d]
    q_pos = i * st.block_q + jax.lax.iota(jnp.int32, st.block_q)

    def body(j, carry):
        m, total, acc = carry
        k = k_ref[0, pl.ds(j * st.block_k, st.block_k), :].astype(jnp.float32)
        v = v_ref[0, pl.ds(j * st.block_k, st.block_k), :].astype(jnp.float32)
        s = jnp.dot(q, k.T) * st.scale
        visible = _visible(st, q_pos, j * st.block_k + jax.lax.iota(jnp.int32, st.block_k))
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        return m_new, total * correction + p.sum(-1), acc * correction[:, None] + jnp.dot(p, v)

    init = (
        jnp.full((st.block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((st.block_q,), jnp.float32),
        jnp.zeros((st.block_q, v_ref.shape[-1]), jnp.float32),
    )
    m, total, acc = jax.lax.fori_loop(0, _key_blocks_for(st, i), body, init)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    o_ref[0, 0] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static):
    i = pl.program_id(2)
    q = q_ref[0, 0].astype(jnp.float32)
    do = do_ref[0, 0].astype(jnp.float32)
    lse, delta = lse_ref[0, 0], delta_ref[0, 0]
    q_pos = i * st.block_q + jax.lax.iota(jnp.int32, st.block_q)

    def body(j, dq):
        k = k_ref[0, pl.ds(j * st.block_k, st.block_k), :].astype(jnp.float32)
        v = v_ref[0, pl.ds(j * st.block_k, st.block_k), :].astype(jnp.float32)
        visible = _visible(st, q_pos, j * st.block_k + jax.lax.iota(jnp.int32, st.block_k))
        p = jnp.where(visible, jnp.exp(jnp.dot(q, k.T) * st.scale - lse[:, None]), 0.0)
        ds = p * (jnp.dot(do, v.T) - delta[:, None])
        return dq + jnp.dot(ds, k) * st.scale

    dq = jax.lax.fori_loop(0, _key_blocks_for(st, i), body, jnp.zeros_like(q))
    dq_ref[0, 0] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: _Static):
    j = pl.program_id(1)
    k = k_ref[0].astype(jnp.float32)  # [bk, d]
    v = v_ref[0].astype(jnp.float32)
    k_pos = j * st.block_k + jax.lax.iota(jnp.int32, st.block_k)

    def body(index, carry):
        dk, dv = carry
        g, i = index // st.num_q_blocks, index % st.num_q_blocks
        rows = pl.ds(i * st.block_q, st.block_q)
        q = q_ref[0, g, rows, :].astype(jnp.float32)
        do = do_ref[0, g, rows, :].astype(jnp.float32)
        lse, delta = lse_ref[0, g, rows], delta_ref[0, g, rows]
        visible = _visible(st, i * st.block_q + jax.lax.iota(jnp.int32, st.block_q), k_pos)
        p = jnp.where(visible, jnp.exp(jnp.dot(q, k.T) * st.scale - lse[:, None]), 0.0)
        ds = p * (jnp.dot(do, v.T) - delta[:, None])
        return dk + jnp.dot(ds.T, q) * st.scale, dv + jnp.dot(p.T, do)

    # Visit (group, query block) pairs, skipping query blocks above the causal diagonal.
    first = _first_query_block(st, j)

    def group_body(g, carry):
        start = g * st.num_q_blocks
        return jax.lax.fori_loop(start + first, start + st.num_q_blocks, body, carry)

    dk, dv = jax.lax.fori_loop(0, st.groups, group_body, (jnp.zeros_like(k), jnp.zeros_like(v)))
    dk_ref[0] = dk.astype(dk_ref.dtype)
    dv_ref[0] = dv.astype(dv_ref.dtype)


def _specs(st: _Static, d: int, dv: int):
    """BlockSpecs of q-like ``[n, g, q_pad, d]`` blocks and whole-sequence k/v."""
    q_block = pl.BlockSpec((1, 1, st.block_q, d), lambda n, g, i: (n, g, i, 0))
    o_block = pl.BlockSpec((1, 1, st.block_q, dv), lambda n, g, i: (n, g, i, 0))
    row_block = pl.BlockSpec((1, 1, st.block_q), lambda n, g, i: (n, g, i))
    kv_len = st.num_k_blocks * st.block_k
    k_whole = pl.BlockSpec((1, kv_len, d), lambda n, g, i: (n, 0, 0))
    v_whole = pl.BlockSpec((1, kv_len, dv), lambda n, g, i: (n, 0, 0))
    return q_block, o_block, row_block, k_whole, v_whole


def _forward(st: _Static, q, k, v):
    n, g, q_pad, d = q.shape
    dv = v.shape[-1]
    q_block, o_block, row_block, k_whole, v_whole = _specs(st, d, dv)
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        out_shape=(_out((n, g, q_pad, dv), q.dtype, q), _out((n, g, q_pad), jnp.float32, q)),
        grid=(n, g, st.num_q_blocks),
        in_specs=[q_block, k_whole, v_whole],
        out_specs=[o_block, row_block],
        interpret=st.interpret,
    )(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v):
    return _forward(st, q, k, v)[0]


def _attention_fwd(st, q, k, v):
    out, lse = _forward(st, q, k, v)
    return out, (q, k, v, out, lse)


def _attention_bwd(st, residuals, d_out):
    q, k, v, out, lse = residuals
    n, g, q_pad, d = q.shape
    dv = v.shape[-1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    q_block, o_block, row_block, k_whole, v_whole = _specs(st, d, dv)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        out_shape=_out(q.shape, q.dtype, q),
        grid=(n, g, st.num_q_blocks),
        in_specs=[q_block, k_whole, v_whole, o_block, row_block, row_block],
        out_specs=q_block,
        interpret=st.interpret,
    )(q, k, v, d_out, lse, delta)
    q_whole = pl.BlockSpec((1, g, q_pad, d), lambda n, j: (n, 0, 0, 0))
    do_whole = pl.BlockSpec((1, g, q_pad, dv), lambda n, j: (n, 0, 0, 0))
    rows_whole = pl.BlockSpec((1, g, q_pad), lambda n, j: (n, 0, 0))
    k_block = pl.BlockSpec((1, st.block_k, d), lambda n, j: (n, j, 0))
    v_block = pl.BlockSpec((1, st.block_k, dv), lambda n, j: (n, j, 0))
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        out_shape=(_out(k.shape, k.dtype, k), _out(v.shape, v.dtype, v)),
        grid=(n, st.num_k_blocks),
        in_specs=[q_whole, k_block, v_block, do_whole, rows_whole, rows_whole],
        out_specs=[k_block, v_block],
        interpret=st.interpret,
    )(q, k, v, d_out, lse, delta)
    return dq, dk, dv_


_attention.defvjp(_attention_fwd, _attention_bwd)


def _out(shape: tuple[int, ...], dtype: Any, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output type that varies over the same ``shard_map`` axes as ``like``."""
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=getattr(jax.typeof(like), "manual_axis_type", None)
    )


@register("pallas_flash", capabilities=Capabilities(causal=True, gqa=True))
def pallas_flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention in Pallas: exact, memory linear in length, forward and backward.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]`` (GQA: ``heads % kv_heads == 0``).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias, mask: not supported (raise ``ValueError``); use ``flash`` for them.
      is_causal: bottom-right causal, as every kernel here; hidden key blocks are skipped.
      block_q, block_k: block sizes (clipped to the padded lengths; use powers of two
        >= 16 on GPU).
      interpret: run the kernels in the Pallas interpreter (default: when the backend is
        not a GPU).

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` in the query's dtype.
    """
    for name, given in (("bias", bias), ("mask", mask)):
        if given is not None:
            raise ValueError(f"pallas_flash: argument '{name}' is not supported; use 'flash'")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    checks.check_qkv(query, key, value)
    checks.check_same_dtype(query, key, value)
    checks.check_block_sizes(block_q=block_q, block_k=block_k)
    batch_shape = query.shape[:-3]
    q_len, heads, d = query.shape[-3:]
    kv_len, kv_heads = key.shape[-3:-1]
    groups = heads // kv_heads
    batch = math.prod(batch_shape)
    bq, bk = min(block_q, _round_up(q_len, 8)), min(block_k, _round_up(kv_len, 8))
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    st = _Static(
        q_len=q_len,
        kv_len=kv_len,
        block_q=bq,
        block_k=bk,
        num_q_blocks=nq,
        num_k_blocks=nk,
        groups=groups,
        scale=float(1.0 / math.sqrt(d) if scale is None else scale),
        is_causal=bool(is_causal),
        interpret=jax.default_backend() != "gpu" if interpret is None else bool(interpret),
    )
    # [batch..., len, heads, d] -> [batch * kv_heads, groups, len, d]
    q = query.reshape(batch, q_len, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    q = blockwise.pad_to(q.reshape(batch * kv_heads, groups, q_len, d), 2, nq * bq)
    k = key.reshape(batch, kv_len, kv_heads, d).transpose(0, 2, 1, 3)
    k = blockwise.pad_to(k.reshape(batch * kv_heads, kv_len, d), 1, nk * bk)
    v = value.reshape(batch, kv_len, kv_heads, -1).transpose(0, 2, 1, 3)
    v = blockwise.pad_to(v.reshape(batch * kv_heads, kv_len, -1), 1, nk * bk)
    out = _attention(st, q, k, v)[:, :, :q_len]
    out = out.reshape(batch, kv_heads, groups, q_len, -1).transpose(0, 3, 1, 2, 4)
    return out.reshape(*batch_shape, q_len, heads, -1)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
