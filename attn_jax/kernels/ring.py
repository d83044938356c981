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
  ...``, so every device does the same work under a causal mask. The default for causal
  attention on whole arrays.

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

from attn_jax.kernels import blockwise, checks
from attn_jax.kernels.blockwise import MASK_VALUE, BlockLayout, zeros_like_inputs
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["ORDERINGS", "ring_attention", "shard_positions"]

ORDERINGS = ("contiguous", "striped")
RING_AXIS = "ring"


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Static description of one device's part of a ring problem (a custom-VJP static arg).

    ``block`` describes the whole problem (true lengths, scale, causal, window) with
    ``block_q`` / ``block_k`` the per-device shard lengths, which are whole numbers of
    ``tile_q`` / ``tile_k``: each ring step walks its shards tile by tile, so no device
    ever holds more than one ``[tile_q, tile_k]`` block of scores.
    """

    block: BlockLayout
    num_devices: int
    ordering: str
    axis_name: str | None  # None: a single device, no communication
    tile_q: int
    tile_k: int

    def positions(self, shard: jax.Array, start: jax.Array, size: int, rows: int) -> jax.Array:
        """Sequence positions ``[size]`` of rows ``start..start + size`` of shard ``shard``
        (``rows`` rows per shard)."""
        return shard_positions(self.ordering, shard, rows, self.num_devices, start, size)

    def may_see(self, i: jax.Array, j: jax.Array) -> jax.Array:
        """False when no query position in ``i`` can see any key position in ``j`` (both
        increasing), by the causal / window structure or the padding: the tile is skipped."""
        b = self.block
        ok = (i[0] < b.q_len) & (j[0] < b.kv_len)
        if b.is_causal:
            ok &= j[0] <= i[-1] + b.offset
        if b.window is not None:
            left, right = b.window
            ok &= (j[0] <= i[-1] + b.offset + right) & (j[-1] >= i[0] + b.offset - left)
        return ok


def shard_positions(
    ordering: str,
    shard: jax.Array,
    rows: int,
    devices: int,
    start: jax.Array | int = 0,
    size: int | None = None,
) -> jax.Array:
    """Sequence positions of rows ``start..start + size`` (default: all ``rows``) of device
    ``shard``'s part of a sequence split over ``devices`` in ``ordering``."""
    local = start + jnp.arange(rows if size is None else size)
    if ordering == "striped":
        return local * devices + shard
    return shard * rows + local


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


def _slice(x: jax.Array | None, start: jax.Array, size: int, axis: int) -> jax.Array | None:
    if x is None:
        return None
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis % x.ndim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Tile:
    """One ``[tile_q, tile_k]`` block of a ring step: rows ``q0`` of this device's queries
    against rows ``k0`` of the key shard that came from device ``src``."""

    q0: jax.Array
    k0: jax.Array
    src: jax.Array
    i: jax.Array  # query positions [tile_q]
    j: jax.Array  # key positions [tile_k]


def _tile(layout: RingLayout, me, src, iq, jk) -> _Tile:
    b = layout.block
    q0, k0 = iq * layout.tile_q, jk * layout.tile_k
    i = layout.positions(me, q0, layout.tile_q, b.block_q)
    j = layout.positions(src, k0, layout.tile_k, b.block_k)
    return _Tile(q0, k0, src, i, j)


def _tile_scores(layout: RingLayout, tile: _Tile, q_t, k_t, bias, mask, q_lengths, kv_lengths):
    """Scores ``[b, h, g, tile_q, tile_k]`` of one tile and their visibility; ``bias`` and
    ``mask`` are this device's rows ``[..., block_q, kv_total]``."""
    b = layout.block
    column = tile.src * b.block_k + tile.k0

    def cut(x):
        return _slice(_slice(x, tile.q0, layout.tile_q, -2), column, layout.tile_k, -1)

    s = blockwise.block_scores(b, q_t, k_t, cut(bias))
    visible = blockwise.position_visibility(
        b, tile.i[:, None], tile.j[None, :], q_lengths, kv_lengths, cut(mask)
    )
    return s, visible


def _forward(layout: RingLayout, q, k, v, bias, mask, q_lengths, kv_lengths):
    """``(out [b, h, g, Sq, dv], lse [b, h, g, Sq])`` for this device's queries."""
    me = _me(layout)
    b = layout.block
    tq, tk = layout.tile_q, layout.tile_k
    inputs = (q, k, v, bias, mask, q_lengths, kv_lengths)

    def key_tile(tile, q_t, k_blk, v_blk, state):
        k_t, v_t = _slice(k_blk, tile.k0, tk, 2), _slice(v_blk, tile.k0, tk, 2)
        s, visible = _tile_scores(layout, tile, q_t, k_t, bias, mask, q_lengths, kv_lengths)
        return blockwise.online_softmax_update(b, state, s, visible, v_t)

    def compute(t, m, total, acc, k_blk, v_blk):
        """Folds the key/value shard held at step ``t`` into the running softmax."""
        src = (me - t) % layout.num_devices

        def query_tile(iq, state):
            m, total, acc = state
            q0 = iq * tq
            q_t = _slice(q, q0, tq, 3)
            tile_state = (_slice(m, q0, tq, 3), _slice(total, q0, tq, 3), _slice(acc, q0, tq, 3))

            def one(jk, st):
                tile = _tile(layout, me, src, iq, jk)
                skip = lambda tile, q_t, k_blk, v_blk, st: st
                return jax.lax.cond(
                    layout.may_see(tile.i, tile.j), key_tile, skip, tile, q_t, k_blk, v_blk, st
                )

            m_t, total_t, acc_t = jax.lax.fori_loop(0, b.block_k // tk, one, tile_state)
            update = lambda x, x_t: jax.lax.dynamic_update_slice_in_dim(x, x_t, q0, axis=3)
            return update(m, m_t), update(total, total_t), update(acc, acc_t)

        return jax.lax.fori_loop(0, b.block_q // tq, query_tile, (m, total, acc))

    def ring_step(t, carry):
        m, total, acc, k_blk, v_blk = carry
        m, total, acc = compute(t, m, total, acc, k_blk, v_blk)
        k_blk, v_blk = _rotate(layout, k_blk, v_blk)
        return m, total, acc, k_blk, v_blk

    stats = q.shape[:-1]
    init = (
        zeros_like_inputs(stats, *inputs, fill=MASK_VALUE),
        zeros_like_inputs(stats, *inputs),
        zeros_like_inputs((*stats, v.shape[-1]), *inputs),
        k,
        v,
    )
    last = layout.num_devices - 1  # P - 1 hops: the last shard needs no sending on
    m, total, acc, k_blk, v_blk = jax.lax.fori_loop(0, last, ring_step, init)
    return blockwise.online_softmax_result(*compute(last, m, total, acc, k_blk, v_blk))


def _backward(
    layout: RingLayout, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse
):
    """Gradients for ``q, k, v, bias``: the key/value shards rotate again, carrying their
    gradient accumulators, which are back on their own device after ``P`` hops."""
    me = _me(layout)
    b = layout.block
    tq, tk = layout.tile_q, layout.tile_k
    delta = (d_out * out).sum(-1) - d_lse  # [b, h, g, Sq]
    inputs = (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse)

    def key_tile(tile, rows, k_blk, v_blk, state):
        q_t, do_t, lse_t, delta_t = rows
        dq_t, dbias, dk_blk, dv_blk = state
        k_t, v_t = _slice(k_blk, tile.k0, tk, 2), _slice(v_blk, tile.k0, tk, 2)
        s, visible = _tile_scores(layout, tile, q_t, k_t, bias, mask, q_lengths, kv_lengths)
        ds, dq_part, dk_t, dv_t = blockwise.block_gradients(
            b, s, visible, q_t, k_t, v_t, do_t, lse_t, delta_t
        )
        dq_t = dq_t + dq_part
        add = lambda x, x_t: jax.lax.dynamic_update_slice_in_dim(
            x, _slice(x, tile.k0, tk, 2) + x_t, tile.k0, axis=2
        )
        dk_blk, dv_blk = add(dk_blk, dk_t), add(dv_blk, dv_t)
        if dbias is not None:
            column = tile.src * b.block_k + tile.k0
            dbias = jax.lax.dynamic_update_slice(dbias, ds, (0, 0, 0, tile.q0, column))
        return dq_t, dbias, dk_blk, dv_blk

    def compute(t, dq, dbias, k_blk, v_blk, dk_blk, dv_blk):
        """Adds the gradients of the key/value shard held at step ``t``."""
        src = (me - t) % layout.num_devices

        def query_tile(iq, state):
            dq, dbias, dk_blk, dv_blk = state
            q0 = iq * tq
            rows = tuple(_slice(x, q0, tq, 3) for x in (q, d_out, lse, delta))

            def one(jk, st):
                tile = _tile(layout, me, src, iq, jk)
                skip = lambda tile, rows, k_blk, v_blk, st: st
                return jax.lax.cond(
                    layout.may_see(tile.i, tile.j), key_tile, skip, tile, rows, k_blk, v_blk, st
                )

            st = (_slice(dq, q0, tq, 3), dbias, dk_blk, dv_blk)
            dq_t, dbias, dk_blk, dv_blk = jax.lax.fori_loop(0, b.block_k // tk, one, st)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_t, q0, axis=3)
            return dq, dbias, dk_blk, dv_blk

        state = (dq, dbias, dk_blk, dv_blk)
        return jax.lax.fori_loop(0, b.block_q // tq, query_tile, state)

    def ring_step(t, carry):
        dq, dbias, k_blk, v_blk, dk_blk, dv_blk = carry
        dq, dbias, dk_blk, dv_blk = compute(t, dq, dbias, k_blk, v_blk, dk_blk, dv_blk)
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
    last = layout.num_devices - 1
    dq, dbias, k_blk, v_blk, dk, dv = jax.lax.fori_loop(0, last, ring_step, init)
    dq, dbias, dk, dv = compute(last, dq, dbias, k_blk, v_blk, dk, dv)
    dk, dv = _rotate(layout, dk, dv)  # the P-th hop brings the accumulators home
    return dq, dk, dv, dbias


_ring = blockwise.attention_with_vjp(_forward, _backward)


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
    block_q: int = 512,
    block_k: int = 512,
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
      num_devices / devices: the ring (whole arrays): the first ``num_devices`` local
        devices, or ``devices``; default every local device (one inside another
        ``pmap``/``shard_map``).
      axis_name: run inside your ``shard_map``/``pmap`` over this axis: the arrays are
        this device's sequence shards, all of one length, and so is the output; lengths
        (``*_seq_lengths``) stay global.
      ordering: ``"contiguous"`` or ``"striped"``; default striped for causal attention on
        whole arrays, else contiguous (with ``axis_name``, ``"striped"`` means device ``d``
        was given positions ``d, d + P, ...``).
      block_q, block_k: tile sizes within a ring step (clipped to the shard lengths):
        memory per device is that of one ``[block_q, block_k]`` tile of scores plus the
        shards.
      return_residual: also return the float32 log-sum-exp ``[batch..., q_len, heads]``.

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` in the query's dtype (or ``dtype``).
    """
    if ordering is None:  # shards given by the caller are contiguous; ours balance causal
        ordering = "striped" if is_causal and axis_name is None else "contiguous"
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
            block_q=block_q,
            block_k=block_k,
            dtype=dtype,
            precision=precision,
            return_residual=return_residual,
            bias=bias,
            mask=mask,
        )
    ring = _ring_devices(num_devices, devices)
    n = len(ring)
    # Shards of ceil(length / n) rounded up to whole tiles (a malformed shape is reported
    # by canonicalize below).
    checks.check_block_sizes(block_q=block_q, block_k=block_k)
    q_len = query.shape[-3] if jnp.ndim(query) >= 3 else 1
    kv_len = key.shape[-3] if jnp.ndim(key) >= 3 else 1
    sq, tq = _shard_and_tile(q_len, n, block_q)
    sk, tk = _shard_and_tile(kv_len, n, block_k)
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
        block_q=sq,
        block_k=sk,
        precision=precision,
        dtype=dtype,
    )
    whole = dataclasses.replace(c.layout, block_q=sq, block_k=sk, num_q_blocks=n, num_k_blocks=n)
    layout = RingLayout(whole, n, ordering, RING_AXIS if n > 1 else None, tq, tk)
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


def _shard_and_tile(length: int, devices: int, block: int) -> tuple[int, int]:
    """``(shard, tile)``: a shard of at least ``ceil(length / devices)`` rows made of whole
    tiles of at most ``block`` rows, as even as possible (padding < one row per tile)."""
    shard = max(1, -(-length // devices))
    tiles = -(-shard // block)
    tile = -(-shard // tiles)
    return tiles * tile, tile


def _divisor_tile(shard: int, block: int, name: str) -> int:
    """The largest divisor of ``shard`` (a caller's shard length) that is at most
    ``block``; one far smaller than both would make the tile loop crawl, so it raises."""
    tile = max(d for d in range(1, min(shard, block) + 1) if shard % d == 0)
    if tile < min(shard, block) // 8:
        raise ValueError(
            f"ring: the local shard length {shard} has no divisor near argument '{name}' "
            f"({block}); pass a '{name}' that divides it, or pad the sequence"
        )
    return tile


def _ring_devices(num_devices: int | None, devices: Sequence[jax.Device] | None) -> list:
    if devices is not None and num_devices is not None:
        raise ValueError("ring: pass at most one of 'num_devices' and 'devices'")
    if devices is not None:
        ring = list(devices)
    elif num_devices is None and _inside_mapped_computation():
        ring = jax.local_devices()[:1]
    else:
        available = jax.local_devices()
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
    block_q,
    block_k,
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
    tiles = _divisor_tile(q_shard, block_q, "block_q"), _divisor_tile(kv_shard, block_k, "block_k")
    layout = RingLayout(whole, n, ordering, axis_name, *tiles)
    out, lse = _ring(layout, c.query, c.key, c.value, None, None, c.q_lengths, c.kv_lengths)
    result = blockwise.restore(out, c)
    if return_residual:
        return result, blockwise.restore_lse(lse, c)
    return result
