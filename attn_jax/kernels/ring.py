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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attn_jax.kernels import blockwise, checks
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.blockwise import MASK_VALUE, BlockLayout, zeros_like_inputs
from attn_jax.kernels.registry import TOKEN_VISIBILITY, register
from attn_jax.kernels.visibility import Tokens

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


def shard_positions(
    ordering: str,
    shard: jax.Array,
    rows: int,
    devices: int,
    start: jax.Array | int = 0,
    size: int | None = None,
) -> jax.Array:
    """Sequence indices of rows ``start..start + size`` (default: all ``rows``) of device
    ``shard``'s part of a sequence split over ``devices`` in ``ordering``."""
    local = start + jnp.arange(rows if size is None else size, dtype=jnp.int32)
    if ordering == "striped":
        return local * devices + shard
    return shard * rows + local


def _rotate(layout: RingLayout, *xs):
    """Every device passes ``xs`` (arrays or pytrees) to the next one on the ring."""
    if layout.axis_name is None:
        return xs
    n = layout.num_devices
    perm = [(d, (d + 1) % n) for d in range(n)]
    send = lambda x: jax.lax.ppermute(x, layout.axis_name, perm)
    return tuple(jax.tree.map(send, x) for x in xs)


def _me(layout: RingLayout) -> jax.Array:
    if layout.axis_name is None:
        return jnp.int32(0)
    return jax.lax.axis_index(layout.axis_name).astype(jnp.int32)


def _slice(x: jax.Array | None, start: jax.Array, size: int, axis: int) -> jax.Array | None:
    if x is None:
        return None
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis % x.ndim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Tile:
    """One ``[tile_q, tile_k]`` block of a ring step: rows ``q0`` of this device's queries
    against rows ``k0`` of the key shard that came from device ``src``, with their tokens
    and the tile's slice of the dense mask (or ``None``)."""

    q0: jax.Array
    k0: jax.Array
    src: jax.Array
    q_tok: Tokens
    k_tok: Tokens
    mask: jax.Array | None


def _tile(layout: RingLayout, src, iq, jk, q_tok, k_tok, mask) -> _Tile:
    """Tile ``(iq, jk)``; ``mask`` is this device's rows ``[..., block_q, kv_total]``."""
    b = layout.block
    q0, k0 = iq * layout.tile_q, jk * layout.tile_k
    column = src * b.block_k + k0
    cut = lambda x: _slice(_slice(x, q0, layout.tile_q, -2), column, layout.tile_k, -1)
    return _Tile(
        q0,
        k0,
        src,
        blockwise.slice_tokens(q_tok, q0, layout.tile_q),
        blockwise.slice_tokens(k_tok, k0, layout.tile_k),
        cut(mask),
    )


def _tile_class(layout: RingLayout, tile: _Tile) -> jax.Array:
    """The tile's :data:`~attn_jax.kernels.visibility.HIDDEN` / ``PARTIAL`` / ``FULL``."""
    classes = blockwise.classify(
        layout.block, tile.q_tok, tile.k_tok, tile.mask, layout.tile_q, layout.tile_k
    )
    return classes[0, 0]


def _tile_scores(layout: RingLayout, tile: _Tile, q_t, k_t, bias):
    """Scores ``[b, h, g, tile_q, tile_k]`` of one tile; ``bias`` is this device's rows."""
    b = layout.block
    column = tile.src * b.block_k + tile.k0
    cut = lambda x: _slice(_slice(x, tile.q0, layout.tile_q, -2), column, layout.tile_k, -1)
    return blockwise.block_scores(b, q_t, k_t, cut(bias))


def _tile_visible(layout: RingLayout, tile: _Tile):
    return blockwise.block_visible(layout.block, tile.q_tok, tile.k_tok, tile.mask)


def _over_tiles(layout: RingLayout, src, q_tok, k_tok, mask, state, key_tile):
    """Runs ``key_tile(tile, visible, iq, state)`` over this step's tiles that are not
    hidden."""
    b = layout.block

    def query_tile(iq, state):
        def one(jk, state):
            tile = _tile(layout, src, iq, jk, q_tok, k_tok, mask)
            return jax.lax.cond(
                _tile_class(layout, tile) == vis.HIDDEN,
                lambda tile, state: state,
                lambda tile, state: key_tile(tile, _tile_visible(layout, tile), iq, state),
                tile,
                state,
            )

        return jax.lax.fori_loop(0, b.block_k // layout.tile_k, one, state)

    return jax.lax.fori_loop(0, b.block_q // layout.tile_q, query_tile, state)


def _forward(layout: RingLayout, q, k, v, bias, aux):
    """``(out [b, h, g, Sq, dv], lse [b, h, g, Sq])`` for this device's queries."""
    mask, q_tok, k_tok = aux
    me = _me(layout)
    b = layout.block
    tq, tk = layout.tile_q, layout.tile_k
    inputs = (q, k, v, bias)

    def compute(t, m, total, acc, k_blk, v_blk, k_tok):
        """Folds the key/value shard held at step ``t`` into the running softmax."""
        src = (me - t) % layout.num_devices

        def key_tile(tile, visible, iq, state):
            m, total, acc = state
            q_t = _slice(q, tile.q0, tq, 3)
            k_t, v_t = _slice(k_blk, tile.k0, tk, 2), _slice(v_blk, tile.k0, tk, 2)
            s = _tile_scores(layout, tile, q_t, k_t, bias)
            rows = tuple(_slice(x, tile.q0, tq, 3) for x in (m, total, acc))
            rows = blockwise.online_softmax_update(b, rows, s, visible, v_t)
            update = lambda x, x_t: jax.lax.dynamic_update_slice_in_dim(x, x_t, tile.q0, axis=3)
            return tuple(update(x, x_t) for x, x_t in zip((m, total, acc), rows, strict=True))

        return _over_tiles(layout, src, q_tok, k_tok, mask, (m, total, acc), key_tile)

    def ring_step(t, carry):
        m, total, acc, k_blk, v_blk, k_tok = carry
        m, total, acc = compute(t, m, total, acc, k_blk, v_blk, k_tok)
        k_blk, v_blk, k_tok = _rotate(layout, k_blk, v_blk, k_tok)
        return m, total, acc, k_blk, v_blk, k_tok

    stats = q.shape[:-1]
    init = (
        zeros_like_inputs(stats, *inputs, fill=MASK_VALUE),
        zeros_like_inputs(stats, *inputs),
        zeros_like_inputs((*stats, v.shape[-1]), *inputs),
        k,
        v,
        k_tok,
    )
    last = layout.num_devices - 1  # P - 1 hops: the last shard needs no sending on
    m, total, acc, k_blk, v_blk, k_tok = jax.lax.fori_loop(0, last, ring_step, init)
    return blockwise.online_softmax_result(*compute(last, m, total, acc, k_blk, v_blk, k_tok))


def _backward(layout: RingLayout, q, k, v, bias, aux, out, lse, d_out, d_lse):
    """Gradients for ``q, k, v, bias``: the key/value shards rotate again (with their
    tokens), carrying their gradient accumulators, which are back home after ``P`` hops."""
    mask, q_tok, k_tok = aux
    me = _me(layout)
    b = layout.block
    tq, tk = layout.tile_q, layout.tile_k
    delta = (d_out * out).sum(-1) - d_lse  # [b, h, g, Sq]
    inputs = (q, k, v, bias, out, lse, d_out, d_lse)

    def compute(t, dq, dbias, k_blk, v_blk, k_tok, dk_blk, dv_blk):
        """Adds the gradients of the key/value shard held at step ``t``."""
        src = (me - t) % layout.num_devices

        def key_tile(tile, visible, iq, state):
            dq, dbias, dk_blk, dv_blk = state
            q_t, do_t, lse_t, delta_t = (_slice(x, tile.q0, tq, 3) for x in (q, d_out, lse, delta))
            k_t, v_t = _slice(k_blk, tile.k0, tk, 2), _slice(v_blk, tile.k0, tk, 2)
            s = _tile_scores(layout, tile, q_t, k_t, bias)
            ds, dq_t, dk_t, dv_t = blockwise.block_gradients(
                b, s, visible, q_t, k_t, v_t, do_t, lse_t, delta_t
            )
            add = lambda x, x_t, start, axis: jax.lax.dynamic_update_slice_in_dim(
                x, _slice(x, start, x_t.shape[axis], axis) + x_t, start, axis=axis
            )
            dq = add(dq, dq_t, tile.q0, 3)
            dk_blk, dv_blk = add(dk_blk, dk_t, tile.k0, 2), add(dv_blk, dv_t, tile.k0, 2)
            if dbias is not None:
                column = tile.src * b.block_k + tile.k0
                start = blockwise.block_start(tile.q0, column)
                dbias = jax.lax.dynamic_update_slice(dbias, ds, start)
            return dq, dbias, dk_blk, dv_blk

        state = (dq, dbias, dk_blk, dv_blk)
        return _over_tiles(layout, src, q_tok, k_tok, mask, state, key_tile)

    def ring_step(t, carry):
        dq, dbias, k_blk, v_blk, k_tok, dk_blk, dv_blk = carry
        dq, dbias, dk_blk, dv_blk = compute(t, dq, dbias, k_blk, v_blk, k_tok, dk_blk, dv_blk)
        rotated = _rotate(layout, k_blk, v_blk, k_tok, dk_blk, dv_blk)
        return dq, dbias, *rotated

    init = (
        zeros_like_inputs(q.shape, *inputs),
        None if bias is None else zeros_like_inputs(bias.shape, *inputs),
        k,
        v,
        k_tok,
        zeros_like_inputs(k.shape, *inputs),
        zeros_like_inputs(v.shape, *inputs),
    )
    last = layout.num_devices - 1
    dq, dbias, k_blk, v_blk, k_tok, dk, dv = jax.lax.fori_loop(0, last, ring_step, init)
    dq, dbias, dk, dv = compute(last, dq, dbias, k_blk, v_blk, k_tok, dk, dv)
    dk, dv = _rotate(layout, dk, dv)  # the P-th hop brings the accumulators home
    return dq, dk, dv, dbias


_ring = blockwise.attention_with_vjp(_forward, _backward)


def _inside_mapped_computation() -> bool:
    """True while tracing inside ``pmap`` / ``shard_map`` / a named ``vmap``."""
    from jax._src import core

    names = getattr(core, "unsafe_get_axis_names", lambda: [])
    return bool(names())


def _stripe(x, axis: int, devices: int):
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


@register("ring", capabilities={*TOKEN_VISIBILITY, "mask", "bias", "residual"})
def ring_attention(
    call: AttentionCall,
    *,
    num_devices: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    axis_name: str | None = None,
    ordering: str | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> AttentionOutput:
    """Exact attention with the sequence split over a ring of devices; no dropout or
    returned weights. Tiles hidden from every query (causal, window, padding, segments)
    are skipped.

    Options:
      num_devices / devices: the ring (whole arrays): the first ``num_devices`` local
        devices, or ``devices``; default every local device (one inside another
        ``pmap``/``shard_map``).
      axis_name: run inside your ``shard_map``/``pmap`` over this axis: the arrays are this
        device's sequence shards, all of one length, and so is the output. Lengths
        (``*_seq_lengths``) and default positions refer to the whole sequence; explicit
        positions and segment ids are this shard's. No dense ``mask`` or ``bias``.
      ordering: ``"contiguous"`` or ``"striped"``; default striped for causal attention on
        whole arrays, else contiguous (with ``axis_name``, ``"striped"`` means device ``d``
        was given positions ``d, d + P, ...``).
      block_q, block_k: tile sizes within a ring step (clipped to the shard lengths):
        memory per device is that of one ``[block_q, block_k]`` tile of scores plus the
        shards.
    """
    if ordering is None:  # shards given by the caller are contiguous; ours balance causal
        ordering = "striped" if call.visibility.is_causal and axis_name is None else "contiguous"
    if ordering not in ORDERINGS:
        checks.fail("ordering", f"expected one of {ORDERINGS}, got {ordering!r}")
    checks.check_block_sizes(block_q=block_q, block_k=block_k)
    if axis_name is not None:
        out, lse, c = _ring_on_shards(call, axis_name, ordering, block_q, block_k)
    else:
        out, lse, c = _ring_on_devices(call, _ring_devices(num_devices, devices), ordering,
                                       block_q, block_k)  # fmt: skip
    residual = blockwise.restore_lse(lse, c) if call.return_residual else None
    return AttentionOutput(blockwise.restore(out, c), residual)


def _pad_tokens(t: Tokens, size: int) -> Tokens:
    return Tokens(
        blockwise.pad_to(t.positions, 1, size),
        blockwise.pad_to(t.valid, 1, size, False),
        None if t.segment_ids is None else blockwise.pad_to(t.segment_ids, 1, size),
    )


def _ring_on_devices(call: AttentionCall, ring: list, ordering: str, block_q: int, block_k: int):
    """Whole arrays: shards them over ``ring`` (lengths padded to a multiple of it)."""
    n = len(ring)
    q_len, kv_len = call.visibility.q_len, call.visibility.kv_len
    # Shards of ceil(length / n) rounded up to whole tiles.
    sq, tq = _shard_and_tile(q_len, n, block_q)
    sk, tk = _shard_and_tile(kv_len, n, block_k)
    c = blockwise.canonicalize(call, block_q=sq, block_k=sk)
    whole = dataclasses.replace(c.layout, block_q=sq, block_k=sk, num_q_blocks=n, num_k_blocks=n)
    layout = RingLayout(whole, n, ordering, RING_AXIS if n > 1 else None, tq, tk)
    pad = blockwise.pad_to
    q = pad(c.query, 3, n * sq)
    k, v = (pad(x, 2, n * sk) for x in (c.key, c.value))
    q_tok, k_tok = _pad_tokens(c.q_tokens, n * sq), _pad_tokens(c.k_tokens, n * sk)
    bias, mask = (
        None if x is None else pad(pad(x, 3, n * sq, fill), 4, n * sk, fill)
        for x, fill in ((c.bias, 0.0), (c.mask, False))
    )
    if ordering == "striped":
        q, k, v = _stripe(q, 3, n), _stripe(k, 2, n), _stripe(v, 2, n)
        q_tok = q_tok.map(lambda x: _stripe(x, 1, n))
        k_tok = k_tok.map(lambda x: _stripe(x, 1, n))
        bias, mask = (_stripe(_stripe(x, 3, n), 4, n) for x in (bias, mask))
    aux = (mask, q_tok, k_tok)
    if n == 1:
        out, lse = _ring(layout, q, k, v, bias, aux)
    else:
        rows, keys, tokens = (
            P(None, None, None, RING_AXIS),
            P(None, None, RING_AXIS),
            P(None, RING_AXIS),
        )
        token_specs = lambda t: t.map(lambda _: tokens)
        aux_specs = (None if mask is None else rows, token_specs(q_tok), token_specs(k_tok))
        mapped = jax.shard_map(
            functools.partial(_ring, layout),
            mesh=Mesh(np.asarray(ring), (RING_AXIS,)),
            in_specs=(rows, keys, keys, None if bias is None else rows, aux_specs),
            out_specs=(rows, rows),
        )
        out, lse = mapped(q, k, v, bias, aux)
    if ordering == "striped":
        out, lse = _unstripe(out, 3, n), _unstripe(lse, 3, n)
    return out, lse, c


def _ring_on_shards(call: AttentionCall, axis_name: str, ordering: str, block_q, block_k):
    """``axis_name`` mode: the arguments are this device's shards."""
    for name in ("bias", "mask"):
        if name in call.requested:
            raise checks.UnsupportedArgumentError(
                f"ring: argument '{name}' is not supported with 'axis_name' (pass whole "
                "arrays, or use is_causal / local_window_size / *_seq_lengths / segment ids)"
            )
    n = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name).astype(jnp.int32)
    q_shard, kv_shard = call.visibility.q_len, call.visibility.kv_len
    whole = dataclasses.replace(call.visibility, q_len=n * q_shard, kv_len=n * kv_shard)
    tokens = whole.tokens(
        shard_positions(ordering, me, q_shard, n), shard_positions(ordering, me, kv_shard, n)
    )
    c = blockwise.canonicalize(call, block_q=q_shard, block_k=kv_shard, tokens=tokens)
    # The key tokens travel around the ring: every one must vary over it (loop carries).
    c.q_tokens, c.k_tokens = (
        t.map(lambda x: _varying(x, axis_name)) for t in (c.q_tokens, c.k_tokens)
    )
    layout = dataclasses.replace(
        c.layout, q_len=n * q_shard, kv_len=n * kv_shard, num_q_blocks=n, num_k_blocks=n
    )
    tiles = _divisor_tile(q_shard, block_q, "block_q"), _divisor_tile(kv_shard, block_k, "block_k")
    layout = RingLayout(layout, n, ordering, axis_name, *tiles)
    out, lse = _ring(layout, c.query, c.key, c.value, None, (None, c.q_tokens, c.k_tokens))
    return out, lse, c


def _varying(x: jax.Array, axis_name: str) -> jax.Array:
    """``x`` typed as varying over ``axis_name`` inside ``shard_map`` (as arrays derived
    from the shards are; constants are not)."""
    axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
    if axis_type is None or axis_name in axis_type.varying:
        return x
    return jax.lax.pcast(x, (axis_name,), to="varying")


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
