"""Shared plumbing of the blockwise kernels (``flash``, ``chunked``, ``ring``).

They work on a canonical layout: queries ``[batch, kv_heads, groups, q_len, dim]`` (GQA:
query head ``h = kv_head * groups + g``), keys/values ``[batch, kv_heads, kv_len, dim]``,
mask and bias ``[batch, kv_heads, groups, q_len, kv_len]`` (or ``None``), lengths
``[batch]``; lengths padded up to whole blocks. Structural masks (causal, window, padding)
are computed per block from positions, never materialised at full size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import checks, softmax_core
from attn_jax.kernels.dot_product import validate_softmax_inputs

__all__ = [
    "BlockLayout",
    "Canonical",
    "attention_with_vjp",
    "block_gradients",
    "block_scores",
    "block_visibility",
    "canonicalize",
    "kv_block_range",
    "online_softmax_result",
    "online_softmax_update",
    "pad_to",
    "position_visibility",
    "zeros_like_inputs",
]

MASK_VALUE = softmax_core.MASK_VALUE


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Static description of a blockwise problem (hashable: a ``custom_vjp`` static arg)."""

    q_len: int  # true lengths
    kv_len: int
    kv_heads: int
    groups: int
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    mask_fn: Callable[..., jax.Array] | None = None
    bias_fn: Callable[..., jax.Array] | None = None
    precision: Any = None

    @property
    def offset(self) -> int:
        """Bottom-right alignment: query ``i`` lines up with key ``i + offset``."""
        return self.kv_len - self.q_len


@dataclasses.dataclass
class Canonical:
    """Inputs in the canonical layout, padded to whole blocks, float32."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    q_lengths: jax.Array | None
    kv_lengths: jax.Array | None
    layout: BlockLayout
    batch_shape: tuple[int, ...]
    heads: int
    out_dtype: Any


def attention_with_vjp(forward: Callable[..., Any], backward: Callable[..., Any]):
    """``attend(layout, q, k, v, bias, mask, q_lengths, kv_lengths) -> (out, lse)`` with a
    custom VJP that saves only the inputs, ``out`` and ``lse`` and calls
    ``backward(layout, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse)
    -> (dq, dk, dv, dbias)``; ``layout`` is static (hashable), masks and lengths get no
    gradient."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attend(layout, q, k, v, bias, mask, q_lengths, kv_lengths):
        return forward(layout, q, k, v, bias, mask, q_lengths, kv_lengths)

    def attend_fwd(layout, *inputs):
        out, lse = forward(layout, *inputs)
        return (out, lse), (*inputs, out, lse)

    def attend_bwd(layout, residuals, cotangents):
        dq, dk, dv, dbias = backward(layout, *residuals, *cotangents)
        return dq, dk, dv, dbias, None, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def block_scores(layout: BlockLayout, q_blk, k_blk, bias_blk) -> jax.Array:
    """Scaled scores ``[b, h, g, n, m]`` of queries ``[b, h, g, n, d]`` against keys
    ``[b, h, m, d]``, plus the block's bias (or ``None``), in float32."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk, precision=layout.precision)
    s = s * jnp.float32(layout.scale)
    return s if bias_blk is None else s + bias_blk


def online_softmax_update(layout: BlockLayout, state, s, visible, v_blk):
    """Folds one block of scores ``s [b, h, g, n, m]`` (where ``visible``) and its values
    ``v_blk [b, h, m, dv]`` into the running ``(max [b, h, g, n], total, acc [.., dv])``."""
    m, total, acc = state
    s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    pv = jnp.einsum("bhgqk,bhkd->bhgqd", p, v_blk, precision=layout.precision)
    return m_new, total * correction + p.sum(-1), acc * correction[..., None] + pv


def online_softmax_result(m, total, acc) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a finished running softmax; rows that saw no key give 0 and 0."""
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe[..., None], jnp.where(seen, m + jnp.log(safe), 0.0)


def block_gradients(layout: BlockLayout, s, visible, q_blk, k_blk, v_blk, do_blk, lse, delta):
    """One block's backward pass from its recomputed scores ``s [b, h, g, n, m]``:
    ``(ds [b, h, g, n, m], dq [b, h, g, n, d], dk [b, h, m, d], dv [b, h, m, dv])``, where
    ``lse`` and ``delta = sum(d_out * out) - d_lse`` are the query rows' ``[b, h, g, n]``."""
    scale, precision = jnp.float32(layout.scale), layout.precision
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk, precision=precision)
    ds = p * (dp - delta[..., None])
    dq = scale * jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_blk, precision=precision)
    dk = scale * jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_blk, precision=precision)
    dv = jnp.einsum("bhgqk,bhgqd->bhkd", p, do_blk, precision=precision)
    return ds, dq, dk, dv


def zeros_like_inputs(shape: tuple[int, ...], *like: jax.Array | None, fill: float = 0.0):
    """A float32 constant that carries the (shard_map) variance of every array in ``like``,
    so loop carries keep one type when the inputs are sharded."""
    tie = sum(a.reshape(-1)[0].astype(jnp.float32) * 0.0 for a in like if a is not None)
    return jnp.full(shape, fill, jnp.float32) + tie


def pad_to(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """``x`` padded with ``value`` at the end of ``axis`` up to ``size``."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def canonicalize(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    scale: float | None,
    is_causal: bool,
    local_window_size: int | Sequence[int] | None,
    query_seq_lengths: jax.Array | None,
    key_value_seq_lengths: jax.Array | None,
    block_q: int,
    block_k: int,
    mask_fn: Callable[..., jax.Array] | None = None,
    bias_fn: Callable[..., jax.Array] | None = None,
    precision: Any = None,
    dtype: Any = None,
) -> Canonical:
    """Validates the ``dot_product`` arguments and brings them to the canonical layout."""
    query, key, value, bias, mask, window, out_dtype = validate_softmax_inputs(
        query,
        key,
        value,
        bias,
        mask,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        dtype=dtype,
    )
    checks.check_block_sizes(block_q=block_q, block_k=block_k)
    batch_shape = tuple(query.shape[:-3])
    q_len, heads, dim = query.shape[-3:]
    kv_len, kv_heads = key.shape[-3], key.shape[-2]
    target = softmax_core.logits_shape(batch_shape, heads, q_len, kv_len)

    batch = math.prod(batch_shape)
    groups = heads // kv_heads
    bq, bk = min(block_q, q_len), min(block_k, kv_len)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)

    def to_f32(x):
        return x.astype(jnp.float32)

    q = to_f32(query).reshape(batch, q_len, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    k = to_f32(key).reshape(batch, kv_len, kv_heads, dim).transpose(0, 2, 1, 3)
    v = to_f32(value).reshape(batch, kv_len, kv_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = pad_to(q, 3, nq * bq), pad_to(k, 2, nk * bk), pad_to(v, 2, nk * bk)

    def full(x, fill):
        x = jnp.broadcast_to(x, target).reshape(batch, kv_heads, groups, q_len, kv_len)
        return pad_to(pad_to(x, 3, nq * bq, fill), 4, nk * bk, fill)

    def lengths(x):
        return None if x is None else jnp.asarray(x, jnp.int32).reshape(batch)

    layout = BlockLayout(
        q_len=q_len,
        kv_len=kv_len,
        kv_heads=kv_heads,
        groups=groups,
        block_q=bq,
        block_k=bk,
        num_q_blocks=nq,
        num_k_blocks=nk,
        scale=float(1.0 / math.sqrt(dim) if scale is None else scale),
        is_causal=bool(is_causal),
        window=window,
        mask_fn=mask_fn,
        bias_fn=bias_fn,
        precision=precision,
    )
    return Canonical(
        query=q,
        key=k,
        value=v,
        bias=None if bias is None else full(to_f32(bias), 0.0),
        mask=None if mask is None else full(mask, False),
        q_lengths=lengths(query_seq_lengths),
        kv_lengths=lengths(key_value_seq_lengths),
        layout=layout,
        batch_shape=batch_shape,
        heads=heads,
        out_dtype=out_dtype,
    )


def restore(out: jax.Array, c: Canonical) -> jax.Array:
    """``[batch, kv_heads, groups, q_pad, dv]`` -> ``[batch..., q_len, heads, dv]``."""
    out = out[:, :, :, : c.layout.q_len]
    _, kv_heads, groups, q_len, dv = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(*c.batch_shape, q_len, kv_heads * groups, dv)
    return out.astype(c.out_dtype)


def restore_lse(lse: jax.Array, c: Canonical) -> jax.Array:
    """``[batch, kv_heads, groups, q_pad]`` -> ``[batch..., q_len, heads]``."""
    lse = lse[..., : c.layout.q_len]
    _, kv_heads, groups, q_len = lse.shape
    return lse.transpose(0, 3, 1, 2).reshape(*c.batch_shape, q_len, kv_heads * groups)


def kv_block_range(layout: BlockLayout, q_start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Key blocks ``[lo, hi)`` that a query block starting at ``q_start`` can see:
    causal and window masks let whole blocks be skipped."""
    lo, hi = jnp.int32(0), jnp.int32(layout.num_k_blocks)
    last = jnp.minimum(q_start + layout.block_q, layout.q_len) - 1 + layout.offset
    first = q_start + layout.offset
    if layout.is_causal:
        hi = jnp.minimum(hi, last // layout.block_k + 1)
    if layout.window is not None:
        left, right = layout.window
        hi = jnp.minimum(hi, (last + right) // layout.block_k + 1)
        lo = jnp.maximum(lo, (first - left) // layout.block_k)
    hi = jnp.clip(hi, 0, layout.num_k_blocks)
    lo = jnp.clip(lo, 0, hi)
    return lo, hi


def block_visibility(
    layout: BlockLayout,
    q_start: jax.Array,
    k_start: jax.Array,
    q_lengths: jax.Array | None,
    kv_lengths: jax.Array | None,
    mask_block: jax.Array | None,
) -> jax.Array:
    """``[batch or 1, kv_heads or 1, groups or 1, block_q, block_k]`` boolean visibility."""
    i = q_start + jnp.arange(layout.block_q)[:, None]
    j = k_start + jnp.arange(layout.block_k)[None, :]
    return position_visibility(layout, i, j, q_lengths, kv_lengths, mask_block)


def position_visibility(
    layout: BlockLayout,
    i: jax.Array,
    j: jax.Array,
    q_lengths: jax.Array | None,
    kv_lengths: jax.Array | None,
    mask_block: jax.Array | None,
) -> jax.Array:
    """Visibility of query positions ``i [n, 1]`` to key positions ``j [1, m]`` (in the
    whole sequences): ``[batch or 1, kv_heads or 1, groups or 1, n, m]``."""
    ok = (i < layout.q_len) & (j < layout.kv_len)
    shifted = i + layout.offset
    if layout.is_causal:
        ok &= j <= shifted
    if layout.window is not None:
        left, right = layout.window
        ok &= (j >= shifted - left) & (j <= shifted + right)
    ok = ok[None, None, None]
    if q_lengths is not None:
        ok = ok & (i < q_lengths[:, None, None, None, None])
    if kv_lengths is not None:
        ok = ok & (j < kv_lengths[:, None, None, None, None])
    if mask_block is not None:
        ok = ok & mask_block
    if layout.mask_fn is not None:
        ok = ok & _per_head(layout.mask_fn(i, j), "mask_fn", layout)
    return ok


def block_bias(
    layout: BlockLayout, q_start: jax.Array, k_start: jax.Array, bias_block: jax.Array | None
) -> jax.Array | None:
    """The additive bias of one block (array slice plus ``bias_fn``), or ``None``."""
    out = bias_block
    if layout.bias_fn is not None:
        i = q_start + jnp.arange(layout.block_q)[:, None]
        j = k_start + jnp.arange(layout.block_k)[None, :]
        extra = _per_head(layout.bias_fn(i, j), "bias_fn", layout).astype(jnp.float32)
        out = extra if out is None else out + extra
    return out


def _per_head(x: jax.Array, name: str, layout: BlockLayout) -> jax.Array:
    """A callable's ``[block_q, block_k]`` or ``[heads, block_q, block_k]`` result, shaped
    to broadcast against ``[batch, kv_heads, groups, block_q, block_k]``."""
    x = jnp.asarray(x)
    if x.ndim == 2:
        return x[None, None, None]
    if x.ndim == 3:
        return x.reshape(1, layout.kv_heads, layout.groups, *x.shape[1:])
    raise checks.AttentionInputError(
        f"argument '{name}': must return [block_q, block_k] or [heads, block_q, block_k], "
        f"got shape {x.shape}"
    )


def slice_block(x: jax.Array | None, q_start: Any, k_start: Any, layout: BlockLayout):
    """``x[..., q_start:+block_q, k_start:+block_k]`` of a canonical mask/bias."""
    if x is None:
        return None
    return jax.lax.dynamic_slice(
        x, (0, 0, 0, q_start, k_start), (*x.shape[:3], layout.block_q, layout.block_k)
    )
