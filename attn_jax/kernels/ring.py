"""Ring attention (Liu et al. 2023): exact attention with the sequence split across devices.

Each device keeps its shard of the queries; the key/value shards travel around the ring of
devices (``lax.ppermute`` inside ``shard_map``), one hop per step, and every device folds
the shard it holds into a running online softmax. After ``P`` steps every query has seen
every key, and no device ever held more than two key/value shards. The backward pass
(a custom VJP) recomputes the weights from the saved log-sum-exp and rotates the key/value
shards again, together with their gradient accumulators, which arrive back home after the
last hop. Per-device memory is that of ``1/P`` of the sequence.

Two orderings of the sequence over the devices:

- ``"contiguous"``: device ``d`` holds positions ``[d * S, (d + 1) * S)``. With a causal or
  window mask, steps whose key shard is entirely hidden are skipped (no compute), but the
  work is unbalanced: the last device does ``P`` steps of work, the first one.
- ``"striped"`` (Brandon et al. 2023): device ``d`` holds positions ``d, d + P, d + 2P,
  ...``, so every device does the same work under a causal mask. The default when
  ``is_causal``.

Called with whole arrays (``axis_name=None``), :func:`ring_attention` shards them itself
over ``num_devices`` devices (default: every device, or one device when it runs inside
another ``pmap``/``shard_map``), pads the lengths to a multiple of the device count and
returns the whole output. Inside your own ``shard_map`` pass ``axis_name``: the arguments
are then this device's shards (in the given ``ordering``) and so is the output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attn_jax.kernels import blockwise
from attn_jax.kernels.blockwise import MASK_VALUE, BlockLayout, zeros_like_inputs
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["ORDERINGS", "ring_attention"]

ORDERINGS = ("contiguous", "striped")
RING_AXIS = "ring"


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Static description of one device's part of a ring problem (a custom-VJP static arg).

    ``block`` describes the whole problem (true lengths, scale, causal, window) with
    ``block_q`` / ``block_k`` the per-device shard lengths.
    """

    block: BlockLayout
    num_devices: int
    ordering: str
    axis_name: str | None  # None: a single device, no communication

    def positions(self, shard: jax.Array, size: int) -> jax.Array:
        """Sequence positions ``[size]`` of shard ``shard`` (``size`` rows per device)."""
        rows = jnp.arange(size)
        if self.ordering == "striped":
            return rows * self.num_devices + shard
        return shard * size + rows

    def may_see(self, me: jax.Array, src: jax.Array) -> jax.Array:
        """False when the key shard ``src`` is entirely hidden from query shard ``me`` by the
        causal / window structure (contiguous ordering only; striped shards always mix)."""
        b = self.block
        if self.ordering == "striped" or (not b.is_causal and b.window is None):
            return jnp.bool_(True)
        q_first = me * b.block_q + b.offset
        q_last = jnp.minimum((me + 1) * b.block_q, b.q_len) - 1 + b.offset
        k_first, k_last = src * b.block_k, (src + 1) * b.block_k - 1
        right = 0 if b.window is None else b.window[1]
        ok = k_first <= q_last + (right if b.window is not None else 0)
        if b.window is not None:
            ok &= k_last >= q_first - b.window[0]
        return ok


def _rotate(layout: RingLayout, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Every device passes ``xs`` to the next one on the ring."""
    if layout.axis_name is None:
        return xs
    n = layout.num_devices
    perm = [(d, (d + 1) % n) for d in range(n)]
    return tuple(jax.lax.ppermute(x, layout.axis_name, perm) for x in xs)


def _me(layout: RingLayout) -> jax.Array:
    if layout.axis_name is None:
        return jnp.int32(0)
    return jax.lax.axis_index(layout.axis_name)


def _columns(x: jax.Array | None, src: jax.Array, layout: RingLayout) -> jax.Array | None:
    """Key columns of shard ``src`` from a row shard ``[..., block_q, kv_total]``."""
    if x is None:
        return None
    size = layout.block.block_k
    return jax.lax.dynamic_slice_in_dim(x, src * size, size, axis=x.ndim - 1)


def _block(layout: RingLayout, q, k_blk, bias, mask, q_lengths, kv_lengths, me, src):
    """Scores ``[b, h, g, Sq, Sk]`` of the local queries against key shard ``src`` and
    their visibility."""
    b = layout.block
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k_blk, precision=b.precision) * jnp.float32(b.scale)
    bias_blk = _columns(bias, src, layout)
    if bias_blk is not None:
        s = s + bias_blk
    i = layout.positions(me, b.block_q)[:, None]
    j = layout.positions(src, b.block_k)[None, :]
    visible = blockwise.position_visibility(
        b, i, j, q_lengths, kv_lengths, _columns(mask, src, layout)
    )
    return s, visible


def _forward(layout: RingLayout, q, k, v, bias, mask, q_lengths, kv_lengths):
    """``(out [b, h, g, Sq, dv], lse [b, h, g, Sq])`` for this device's queries."""
    me = _me(layout)
    inputs = (q, k, v, bias, mask, q_lengths, kv_lengths)
    stats = q.shape[:-1]

    def update(src, m, total, acc, k_blk, v_blk):
        s, visible = _block(layout, q, k_blk, bias, mask, q_lengths, kv_lengths, me, src)
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bhgqk,bhkd->bhgqd", p, v_blk, precision=layout.block.precision)
        return m_new, total * correction + p.sum(-1), acc * correction[..., None] + pv

    def step(t, carry):
        m, total, acc, k_blk, v_blk = carry
        src = (me - t) % layout.num_devices
        m, total, acc = jax.lax.cond(
            layout.may_see(me, src),
            update,
            lambda src, m, total, acc, k_blk, v_blk: (m, total, acc),
            src,
            m,
            total,
            acc,
            k_blk,
            v_blk,
        )
        k_blk, v_blk = _rotate(layout, k_blk, v_blk)
        return m, total, acc, k_blk, v_blk

    init = (
        zeros_like_inputs(stats, *inputs, fill=MASK_VALUE),
        zeros_like_inputs(stats, *inputs),
        zeros_like_inputs((*stats, v.shape[-1]), *inputs),
        k,
        v,
    )
    m, total, acc, _, _ = jax.lax.fori_loop(0, layout.num_devices, step, init)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe[..., None], jnp.where(seen, m + jnp.log(safe), 0.0)


def _backward(
    layout: RingLayout, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse
):
    """Gradients for ``q, k, v, bias``: the key/value shards rotate again, carrying their
    gradient accumulators, which are back on their own device after ``P`` hops."""
    me = _me(layout)
    b = layout.block
    scale = jnp.float32(b.scale)
    delta = (d_out * out).sum(-1) - d_lse  # [b, h, g, Sq]
    inputs = (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse)

    def grads(src, dq, dbias, k_blk, v_blk, dk_blk, dv_blk):
        s, visible = _block(layout, q, k_blk, bias, mask, q_lengths, kv_lengths, me, src)
        p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", d_out, v_blk, precision=b.precision)
        ds = p * (dp - delta[..., None])
        dq = dq + scale * jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_blk, precision=b.precision)
        dk_blk = dk_blk + scale * jnp.einsum("bhgqk,bhgqd->bhkd", ds, q, precision=b.precision)
        dv_blk = dv_blk + jnp.einsum("bhgqk,bhgqd->bhkd", p, d_out, precision=b.precision)
        if dbias is not None:
            dbias = jax.lax.dynamic_update_slice_in_dim(
                dbias, ds, src * b.block_k, axis=dbias.ndim - 1
            )
        return dq, dbias, dk_blk, dv_blk

    def step(t, carry):
        dq, dbias, k_blk, v_blk, dk_blk, dv_blk = carry
        src = (me - t) % layout.num_devices
        dq, dbias, dk_blk, dv_blk = jax.lax.cond(
            layout.may_see(me, src),
            grads,
            lambda src, dq, dbias, k_blk, v_blk, dk_blk, dv_blk: (dq, dbias, dk_blk, dv_blk),
            src,
            dq,
            dbias,
            k_blk,
            v_blk,
            dk_blk,
            dv_blk,
        )
        k_blk, v_blk, dk_blk, dv_blk = _rotate(layout, k_blk, v_blk, dk_blk, dv_blk)
        return dq, dbias, k_blk, v_blk, dk_blk, dv_blk

    init = (
        zeros_like_inputs(q.shape, *inputs),
        None if bias is None else zeros_like_inputs(bias.shape, *inputs),
        k,
        v,
        zeros_like_inputs(k.shape, *inputs),
        zeros_like_inputs(v.shape, *inputs),
    )
    dq, dbias, _, _, dk, dv = jax.lax.fori_loop(0, layout.num_devices, step, init)
    return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(layout, q, k, v, bias, mask, q_lengths, kv_lengths):
    return _forward(layout, q, k, v, bias, mask, q_lengths, kv_lengths)


def _ring_fwd(layout, q, k, v, bias, mask, q_lengths, kv_lengths):
    out, lse = _forward(layout, q, k, v, bias, mask, q_lengths, kv_lengths)
    return (out, lse), (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse)


def _ring_bwd(layout, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, dbias = _backward(
        layout, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse
    )
    return dq, dk, dv, dbias, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _inside_mapped_computation() -> bool:
    """True while tracing inside ``pmap`` / ``shard_map`` / a named ``vmap``."""
    from jax._src import core

    names = getattr(core, "unsafe_get_axis_names", lambda: [])
    return bool(names())


def _stripe(x: jax.Array | None, axis: int, devices: int) -> jax.Array | None:
    """Reorders ``axis`` (length ``devices * S``) so that device ``d``'s contiguous shard
    holds positions ``d, d + P, ...``; :func:`_unstripe` undoes it."""
    if x is None or devices == 1:
        return x
    shape = x.shape
    x = x.reshape(*shape[:axis], -1, devices, *shape[axis + 1 :])
    return jnp.swapaxes(x, axis, axis + 1).reshape(shape)


def _unstripe(x: jax.Array, axis: int, devices: int) -> jax.Array:
    if devices == 1:
        return x
    shape = x.shape
    x = x.reshape(*shape[:axis], devices, -1, *shape[axis + 1 :])
    return jnp.swapaxes(x, axis, axis + 1).reshape(shape)


@register(
    "ring",
    capabilities=Capabilities(
        mask=True, bias=True, causal=True, window=True, seq_lengths=True, gqa=True, residual=True
    ),
)
def ring_attention(
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
    num_devices: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    axis_name: str | None = None,
    ordering: str | None = None,
    dtype: Any = None,
    precision: Any = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Exact attention with the sequence split over a ring of devices.

    Same arguments and conventions as :func:`attn_jax.kernels.dot_product_attention`
    (bottom-right causal, GQA, zeros for rows that see no key), without dropout or
    returned weights.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]``.
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias, mask: dense arrays broadcastable to ``[batch..., heads, q_len, kv_len]``; each
        device keeps its rows (whole arrays only, not with ``axis_name``).
      num_devices / devices: the ring (whole arrays): the first ``num_devices`` devices,
        or ``devices``; default every device (one inside another ``pmap``/``shard_map``).
      axis_name: run inside your ``shard_map``/``pmap`` over this axis: the arrays are
        this device's sequence shards, all of one length, and so is the output; lengths
        (``*_seq_lengths``) stay global.
      ordering: ``"contiguous"`` or ``"striped"`` (default: striped when causal).
      return_residual: also return the float32 log-sum-exp ``[batch..., q_len, heads]``.

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` in the query's dtype (or ``dtype``).
    """
    ordering = ordering or ("striped" if is_causal else "contiguous")
    if ordering not in ORDERINGS:
        raise ValueError(f"ring: argument 'ordering' must be one of {ORDERINGS}, got {ordering!r}")
    if axis_name is not None:
        return _ring_on_shards(
            query,
            key,
            value,
            scale=scale,
            is_causal=is_causal,
            local_window_size=local_window_size,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            axis_name=axis_name,
            ordering=ordering,
            dtype=dtype,
            precision=precision,
            return_residual=return_residual,
            bias=bias,
            mask=mask,
        )
    ring = _ring_devices(num_devices, devices)
    n = len(ring)
    # Shards of ceil(length / n); a malformed shape is reported by canonicalize below.
    q_len = query.shape[-3] if jnp.ndim(query) >= 3 else 1
    kv_len = key.shape[-3] if jnp.ndim(key) >= 3 else 1
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
        block_q=max(1, -(-q_len // n)),
        block_k=max(1, -(-kv_len // n)),
        precision=precision,
        dtype=dtype,
    )
    sq, sk = c.layout.block_q, c.layout.block_k
    layout = RingLayout(
        dataclasses.replace(c.layout, num_q_blocks=n, num_k_blocks=n),
        n,
        ordering,
        RING_AXIS if n > 1 else None,
    )
    pad = blockwise.pad_to
    q = _stripe(pad(c.query, 3, n * sq), 3, n) if ordering == "striped" else pad(c.query, 3, n * sq)
    k, v = (pad(x, 2, n * sk) for x in (c.key, c.value))
    bias_, mask_ = (
        None if x is None else pad(pad(x, 3, n * sq, fill), 4, n * sk, fill)
        for x, fill in ((c.bias, 0.0), (c.mask, False))
    )
    if ordering == "striped":
        k, v = _stripe(k, 2, n), _stripe(v, 2, n)
        bias_, mask_ = (_stripe(_stripe(x, 3, n), 4, n) for x in (bias_, mask_))
    args = (q, k, v, bias_, mask_, c.q_lengths, c.kv_lengths)
    if n == 1:
        out, lse = _ring(layout, *args)
    else:
        rows, keys = P(None, None, None, RING_AXIS), P(None, None, RING_AXIS)
        specs = (rows, keys, keys, rows, rows, P(), P())
        mapped = jax.shard_map(
            functools.partial(_ring, layout),
            mesh=Mesh(np.asarray(ring), (RING_AXIS,)),
            in_specs=tuple(None if a is None else s for a, s in zip(args, specs, strict=True)),
            out_specs=(rows, rows),
        )
        out, lse = mapped(*args)
    if ordering == "striped":
        out, lse = _unstripe(out, 3, n), _unstripe(lse, 3, n)
    result = blockwise.restore(out, c)
    if return_residual:
        return result, blockwise.restore_lse(lse, c)
    return result


def _ring_devices(num_devices: int | None, devices: Sequence[jax.Device] | None) -> list:
    if devices is not None and num_devices is not None:
        raise ValueError("ring: pass at most one of 'num_devices' and 'devices'")
    if devices is not None:
        ring = list(devices)
    elif num_devices is None and _inside_mapped_computation():
        ring = jax.devices()[:1]
    else:
        available = jax.devices()
        wanted = len(available) if num_devices is None else num_devices
        if not isinstance(wanted, int) or not 1 <= wanted <= len(available):
            raise ValueError(
                f"ring: argument 'num_devices' must be 1..{len(available)}, got {num_devices!r}"
            )
        ring = available[:wanted]
    if not ring:
        raise ValueError("ring: argument 'devices' is empty")
    return ring


def _ring_on_shards(
    query,
    key,
    value,
    *,
    scale,
    is_causal,
    local_window_size,
    query_seq_lengths,
    key_value_seq_lengths,
    axis_name,
    ordering,
    dtype,
    precision,
    return_residual,
    bias,
    mask,
):
    """``axis_name`` mode: the arguments are this device's shards."""
    for name, value_ in (("bias", bias), ("mask", mask)):
        if value_ is not None:
            raise ValueError(
                f"ring: argument '{name}' is not supported with 'axis_name' (pass whole "
                "arrays, or use is_causal / local_window_size / *_seq_lengths)"
            )
    n = jax.lax.axis_size(axis_name)
    q_shard, kv_shard = query.shape[-3], key.shape[-3]
    c = blockwise.canonicalize(  # the local shards; lengths and masks refer to positions
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
        block_q=q_shard,
        block_k=kv_shard,
        precision=precision,
        dtype=dtype,
    )
    whole = dataclasses.replace(
        c.layout, q_len=n * q_shard, kv_len=n * kv_shard, num_q_blocks=n, num_k_blocks=n
    )
    layout = RingLayout(whole, n, ordering, axis_name)
    out, lse = _ring(layout, c.query, c.key, c.value, None, None, c.q_lengths, c.kv_lengths)
    result = blockwise.restore(out, c)
    if return_residual:
        return result, blockwise.restore_lse(lse, c)
    return result
