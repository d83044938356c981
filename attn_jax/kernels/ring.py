"""Ring attention (Liu et al. 2023): exact attention with the sequence split across devices.

Each device keeps its shard of the queries; the key/value shards travel around the ring of
devices (``lax.ppermute`` inside ``shard_map``), one hop per step, and every device folds
the shard it holds into a running online softmax. After ``P`` steps every query has seen
every key, and no device ever held more than two key/value shards. Each step is a
blockwise problem of ``flash`` (the same tiles, score functions, soft cap, sinks, fused
dropout by global coordinates), with the tile classes of every step computed once per call.

Derivatives come from the JVP (:func:`_ring_jvp`): a loop over the steps whose body
fetches that step's key/value shard and tangents by one collective permute and is
rematerialised. JAX transposes it for reverse mode (each step fetches its shard again and
sends the shard's gradient back) and differentiates it again for forward mode and higher
orders (``jax.jvp``, ``jax.jacfwd``, Hessian-vector products). Per-device memory is that of
``1/P`` of the sequence, forward and backward.

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

from attn_jax.kernels import block_features, blockwise, checks, flash
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.blockwise import BlockLayout
from attn_jax.kernels.registry import BLOCKWISE_FEATURES, register
from attn_jax.kernels.visibility import Tokens

__all__ = ["ORDERINGS", "ring_attention", "shard_positions"]

ORDERINGS = ("contiguous", "striped")
RING_AXIS = "ring"


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Static description of one device's part of a ring problem (a custom-JVP static arg).

    ``block`` describes the whole problem (true lengths, scale, causal, window, the score
    pipeline) with ``block_q`` / ``block_k`` the per-device shard lengths, which are whole
    numbers of ``tile_q`` / ``tile_k``: each ring step walks its shards tile by tile, so no
    device ever holds more than one ``[tile_q, tile_k]`` block of scores.
    """

    block: BlockLayout
    num_devices: int
    ordering: str
    axis_name: str | None  # None: a single device, no communication
    tile_q: int
    tile_k: int

    @property
    def tiles(self) -> BlockLayout:
        """One ring step as a blockwise problem: this device's queries against one key
        shard, in blocks of one tile."""
        return dataclasses.replace(
            self.block,
            block_q=self.tile_q,
            block_k=self.tile_k,
            num_q_blocks=self.block.block_q // self.tile_q,
            num_k_blocks=self.block.block_k // self.tile_k,
        )


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


def _shift(layout: RingLayout, xs, hops: int):
    """Every device passes ``xs`` (a pytree) to the device ``hops`` further on the ring."""
    n = layout.num_devices
    if layout.axis_name is None or hops % n == 0:
        return xs
    perm = [(d, (d + hops) % n) for d in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, layout.axis_name, perm), xs)


def _me(layout: RingLayout) -> jax.Array:
    if layout.axis_name is None:
        return jnp.int32(0)
    return jax.lax.axis_index(layout.axis_name).astype(jnp.int32)


def _source(layout: RingLayout, step) -> jax.Array:
    """The device whose key shard this one holds at ring step ``step``."""
    return (_me(layout) - step) % layout.num_devices


def _columns(layout: RingLayout, rows: jax.Array | None, src) -> jax.Array | None:
    """Device ``src``'s key columns ``[..., block_q, block_k]`` of this device's rows of a
    dense mask or bias ``[..., block_q, num_devices * block_k]`` (``None`` stays)."""
    if rows is None:
        return None
    width = layout.block.block_k
    return jax.lax.dynamic_slice_in_dim(rows, src * width, width, axis=rows.ndim - 1)


def _tile_classes(layout: RingLayout, q_tok: Tokens, k_tok: Tokens, mask, mask_consts):
    """``[num_devices, q_tiles, k_tiles]`` int32: the class of every tile of every ring step
    (visibility model, dense mask and ``mask_fn``, evaluated one tile at a time), computed
    once per call while the key tokens travel the ring once."""
    tiles = layout.tiles

    def step(k_tok, t):
        src = _source(layout, t)
        classes = blockwise.classify(
            tiles, q_tok, k_tok, _columns(layout, mask, src), tiles.block_q, tiles.block_k
        )
        if tiles.fns.mask_fn is not None:
            hidden, full = block_features.mask_fn_classes(
                tiles.fns, tiles.kv_heads, tiles.groups, q_tok, k_tok, mask_consts,
                tiles.block_q, tiles.block_k,
            )  # fmt: skip
            classes = block_features.combine_classes(classes, hidden, full)
        return _shift(layout, k_tok, 1), classes

    steps = jnp.arange(layout.num_devices, dtype=jnp.int32)
    return jax.lax.scan(step, k_tok, steps)[1]


def _plan(classes: jax.Array) -> blockwise.Plan:
    return blockwise.Plan(classes, *vis.visible_blocks(classes))


def _step_aux(layout: RingLayout, aux, step, k_tok: Tokens) -> tuple:
    """The auxiliary inputs of ring step ``step`` as a blockwise problem (flash's layout):
    the mask's columns, tokens, the step's tile plan, ``mask_fn`` constants, dropout seed."""
    mask, q_tok, _, classes, mask_consts, seed = aux
    cols = _columns(layout, mask, _source(layout, step))
    return cols, q_tok, k_tok, _plan(classes[step]), mask_consts, seed


def _forward(layout: RingLayout, q, k, v, bias, sinks, consts, aux):
    """``(out [b, h, g, Sq, dv], lse [b, h, g, Sq])`` for this device's queries: the key
    and value shards travel the ring in their storage dtype, one hop per step."""
    tiles = layout.tiles
    tq = layout.tile_q

    def fold(t, state, k_blk, v_blk, k_tok):
        """Folds the key/value shard held at step ``t`` into the running softmax."""
        aux_t = _step_aux(layout, aux, t, k_tok)
        bias_t = _columns(layout, bias, _source(layout, t))

        def query_tile(iq, state):
            rows = tuple(jax.lax.dynamic_slice_in_dim(x, iq * tq, tq, axis=3) for x in state)
            rows = flash.fold_query_block(tiles, q, k_blk, v_blk, bias_t, consts, aux_t, iq, rows)
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(x, r, iq * tq, axis=3)
                for x, r in zip(state, rows, strict=True)
            )

        return jax.lax.fori_loop(0, tiles.num_q_blocks, query_tile, state)

    def ring_step(t, carry):
        state, k_blk, v_blk, k_tok = carry
        state = fold(t, state, k_blk, v_blk, k_tok)
        return state, *_shift(layout, (k_blk, v_blk, k_tok), 1)

    store = lambda x: x.astype(tiles.dtype)
    init = blockwise.online_softmax_init(q.shape[:-1], v.shape[-1], sinks, q, k, v, bias)
    last = layout.num_devices - 1  # P - 1 hops: the last shard needs no sending on
    carry = (init, store(k), store(v), aux[2])
    state, k_blk, v_blk, k_tok = jax.lax.fori_loop(0, last, ring_step, carry)
    return blockwise.online_softmax_result(*fold(last, state, k_blk, v_blk, k_tok))


def _fetch(layout: RingLayout, xs, step):
    """``xs`` of the device ``step`` places back on the ring (``step`` traced): one
    collective permute by a static shift, chosen by ``lax.switch``."""
    if layout.axis_name is None:
        return xs
    shifts = [functools.partial(_shift, layout, hops=hops) for hops in range(layout.num_devices)]
    return jax.lax.switch(step, shifts, xs)


def _step_tangent(layout: RingLayout, step, primals, tangents, lse):
    """Ring step ``step``'s part of the JVP's key sums (:func:`flash.tangent_terms`), with
    the key/value shard of ``step`` devices back and its tangents fetched directly (in
    their storage dtype) rather than carried from the previous step: its transpose then
    needs nothing of the other steps."""
    q, k, v, bias, consts, aux = primals
    tq, tk, tv, tbias, t_consts = tangents
    dtype = layout.block.dtype
    sent = _fetch(layout, (tuple(x.astype(dtype) for x in (k, v, tk, tv)), aux[2]), step)
    k_s, v_s, tk_s, tv_s = (x.astype(jnp.float32) for x in sent[0])
    aux_t = _step_aux(layout, aux, step, sent[1])
    src = _source(layout, step)
    return flash.tangent_terms(
        layout.tiles,
        (q, k_s, v_s, _columns(layout, bias, src), consts, aux_t),
        (tq, tk_s, tv_s, _columns(layout, tbias, src), t_consts),
        lse,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ring(layout: RingLayout, q, k, v, bias, sinks, consts, aux):
    return _forward(layout, q, k, v, bias, sinks, consts, aux)


@_ring.defjvp
def _ring_jvp(layout: RingLayout, primals, tangents):
    """The JVP, a loop over the ring steps whose body is rematerialised; JAX transposes it
    for reverse mode (one step at a time, each fetching its shard again and sending the
    shard's gradient back) and differentiates it again for higher orders."""
    q, k, v, bias, sinks, consts, aux = primals
    tq, tk, tv, tbias, t_sinks, t_consts = tangents[:6]
    out, lse = _forward(layout, *primals)
    step_terms = jax.checkpoint(functools.partial(_step_tangent, layout))

    def body(step, acc):
        terms = step_terms(step, (q, k, v, bias, consts, aux), (tq, tk, tv, tbias, t_consts), lse)
        return acc[0] + terms[0], acc[1] + terms[1]

    zeros = blockwise.zeros_like_inputs(lse.shape, q, k, v, tq, tk, tv)
    init = (jnp.zeros(out.shape, jnp.float32) + zeros[..., None], zeros)
    t_values, t_lse = jax.lax.fori_loop(0, layout.num_devices, body, init)
    return (out, lse), flash.combine_tangent(t_values, t_lse, sinks, t_sinks, out, lse)


def _key_mass(layout: RingLayout, q, k, bias, consts, aux, lse) -> jax.Array:
    """The attention mass ``[b, h, g, Sk]`` of this device's keys: each key shard travels
    the ring with its mass accumulator, which every device adds its queries' weights to,
    and is back home after ``P`` hops."""
    tiles = layout.tiles
    store = lambda x: x.astype(tiles.dtype)

    def step(t, carry):
        k_blk, k_tok, mass = carry
        mask_t, q_tok, _, plan_t, mask_consts, _ = _step_aux(layout, aux, t, k_tok)
        bias_t = _columns(layout, bias, _source(layout, t))
        mass = mass + blockwise.key_mass_of(
            tiles, plan_t, q, k_blk, bias_t, consts, q_tok, k_tok, mask_t, mask_consts, lse
        )
        return _shift(layout, (k_blk, k_tok, mass), 1)

    zeros = blockwise.zeros_like_inputs((*q.shape[:3], k.shape[2]), q, k)
    carry = (store(jax.lax.stop_gradient(k)), aux[2], zeros)
    return jax.lax.fori_loop(0, layout.num_devices, step, carry)[2]


def _ring_device(layout: RingLayout, with_mass: bool, q, k, v, bias, sinks, consts, aux_in):
    """One device's part: ``(out, lse)`` and, ``with_mass``, its keys' attention mass.
    ``aux_in``: ``(mask rows, query tokens, key tokens, mask_fn constants, seed)``."""
    mask, q_tok, k_tok, mask_consts, seed = aux_in
    classes = _tile_classes(layout, q_tok, k_tok, mask, mask_consts)
    aux = (mask, q_tok, k_tok, classes, mask_consts, seed)
    out, lse = _ring(layout, q, k, v, bias, sinks, consts, aux)
    if not with_mass:
        return out, lse
    return out, lse, _key_mass(layout, q, k, bias, consts, aux, lse)


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


@register("ring", capabilities=BLOCKWISE_FEATURES)
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
    """Exact attention with the sequence split over a ring of devices; score and mask
    functions, soft cap, sinks, fused dropout and the attention mass as in ``flash``; no
    returned weights. Tiles hidden from every query (causal, window, padding, segments,
    ``mask_fn``) are skipped; derivatives of every order (``jax.grad``, ``jax.jvp``,
    Hessian-vector products) keep per-device memory that of the shards.

    Options:
      num_devices / devices: the ring (whole arrays): the first ``num_devices`` local
        devices, or ``devices``; default every local device (one inside another
        ``pmap``/``shard_map``).
      axis_name: run inside your ``shard_map``/``pmap`` over this axis: the arrays are this
        device's sequence shards, all of one length, and so is the output (and the
        attention mass: this shard's keys'). Lengths (``*_seq_lengths``), default positions
        and the fused dropout's mask refer to the whole sequence; explicit positions and
        segment ids are this shard's. No dense ``mask`` or ``bias``.
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
        out, lse, mass, c = _ring_on_shards(call, axis_name, ordering, block_q, block_k)
    else:
        ring = _ring_devices(num_devices, devices)
        out, lse, mass, c = _ring_on_devices(call, ring, ordering, block_q, block_k)
    residual = blockwise.restore_lse(lse, c) if call.return_residual else None
    mass = None if mass is None else blockwise.restore_mass(mass, c)
    return AttentionOutput(blockwise.restore(out, c), residual, mass=mass)


def _pad_tokens(t: Tokens, size: int) -> Tokens:
    return Tokens(
        blockwise.pad_to(t.positions, 1, size),
        blockwise.pad_to(t.valid, 1, size, False),
        None if t.segment_ids is None else blockwise.pad_to(t.segment_ids, 1, size),
        blockwise.pad_to(t.index, 1, size),
    )


def _ring_on_devices(call: AttentionCall, ring: list, ordering: str, block_q: int, block_k: int):
    """Whole arrays: shards them over ``ring`` (lengths padded to a multiple of it)."""
    n = len(ring)
    q_len, kv_len = call.visibility.q_len, call.visibility.kv_len
    # Shards of ceil(length / n) rounded up to whole tiles.
    sq, tq = _shard_and_tile(q_len, n, block_q)
    sk, tk = _shard_and_tile(kv_len, n, block_k)
    c = blockwise.canonicalize(call, block_q=sq, block_k=sk, autodiff=True, function_block=(tq, tk))
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
    with_mass = call.return_attention_mass
    device = functools.partial(_ring_device, layout, with_mass)
    aux = (mask, q_tok, k_tok, c.mask_consts, c.seed)
    args = (q, k, v, bias, c.sinks, c.score_consts, aux)
    if n == 1:
        results = device(*args)
    else:
        rows, keys, tokens = (
            P(None, None, None, RING_AXIS),
            P(None, None, RING_AXIS),
            P(None, RING_AXIS),
        )
        same = lambda tree: jax.tree.map(lambda _: P(), tree)  # replicated
        token_specs = lambda t: t.map(lambda _: tokens)
        aux_specs = (
            None if mask is None else rows,
            token_specs(q_tok),
            token_specs(k_tok),
            same(c.mask_consts),
            same(c.seed),
        )
        bias_spec = None if bias is None else rows
        in_specs = (rows, keys, keys, bias_spec, same(c.sinks), same(c.score_consts), aux_specs)
        mapped = jax.shard_map(
            device,
            mesh=Mesh(np.asarray(ring), (RING_AXIS,)),
            in_specs=in_specs,
            out_specs=(rows, rows, rows) if with_mass else (rows, rows),
            # score_fn / mask_fn were traced outside, on arrays of no manual axis type.
            check_vma=False,
        )
        results = mapped(*args)
    out, lse = results[0], results[1]
    mass = results[2] if with_mass else None
    if ordering == "striped":
        out, lse = _unstripe(out, 3, n), _unstripe(lse, 3, n)
        mass = None if mass is None else _unstripe(mass, 3, n)
    return out, lse, mass, c


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
    q_index = shard_positions(ordering, me, q_shard, n)
    k_index = shard_positions(ordering, me, kv_shard, n)
    tokens = whole.tokens(q_index, k_index)
    tiles = _divisor_tile(q_shard, block_q, "block_q"), _divisor_tile(kv_shard, block_k, "block_k")
    c = blockwise.canonicalize(
        call, block_q=q_shard, block_k=kv_shard, tokens=tokens, autodiff=True,
        function_block=tiles, axis_name=axis_name,
    )  # fmt: skip
    # Where each token sits in the whole sequence (the fused dropout's coordinates); the
    # key tokens travel around the ring: every one must vary over it (loop carries).
    c.q_tokens = dataclasses.replace(c.q_tokens, index=q_index[None])
    c.k_tokens = dataclasses.replace(c.k_tokens, index=k_index[None])
    c.q_tokens, c.k_tokens = (
        t.map(lambda x: block_features.varying(x, axis_name)) for t in (c.q_tokens, c.k_tokens)
    )
    layout = dataclasses.replace(
        c.layout, q_len=n * q_shard, kv_len=n * kv_shard, num_q_blocks=n, num_k_blocks=n
    )
    layout = RingLayout(layout, n, ordering, axis_name, *tiles)
    aux = (None, c.q_tokens, c.k_tokens, c.mask_consts, c.seed)
    results = _ring_device(
        layout, call.return_attention_mass, c.query, c.key, c.value, None, c.sinks,
        c.score_consts, aux,
    )  # fmt: skip
    mass = results[2] if call.return_attention_mass else None
    return results[0], results[1], mass, c


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
