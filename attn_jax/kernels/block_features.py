"""The score pipeline of the blockwise softmax kernels, one block at a time.

For a block of queries ``[B, kv_heads, groups, n, d]`` against keys ``[B, kv_heads, m, d]``
(the canonical layout of :mod:`attn_jax.kernels.blockwise`):

- :func:`logits`: ``q . k * scale + bias``, then ``score_fn``, then the soft cap;
- :func:`visible`: the visibility model's tokens, the dense mask's block and ``mask_fn``;
- :func:`keep`: the fused dropout's keep factors, a hash of the key and the block's global
  coordinates (batch, head, query index, key index), so that the backward pass
  regenerates exactly the forward's mask and no ``q_len x kv_len`` array is ever stored;
- :func:`mask_fn_classes`: hidden / partly / fully visible blocks by ``mask_fn``, computed
  block by block once per call.

``score_fn`` and ``mask_fn`` are closure-converted (:func:`convert`): the arrays they close
over become explicit inputs, so that kernels with custom derivatives differentiate them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.kernels import checks
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.visibility import Tokens

__all__ = [
    "BlockFunctions",
    "dropout_keep_mask",
    "keep",
    "logits",
    "mask_fn_classes",
]


@dataclasses.dataclass(frozen=True)
class BlockFunctions:
    """The static part of a call's score pipeline (hashable: part of a block layout).

    ``score_fn(score, batch, head, q_pos, kv_pos, *score_consts)`` and ``mask_fn(batch,
    head, q_pos, kv_pos, *mask_consts)`` are closure-converted; ``heads`` is ``kv_heads *
    groups``.
    """

    score_fn: Callable[..., jax.Array] | None = None
    mask_fn: Callable[..., jax.Array] | None = None
    soft_cap: float | None = None
    dropout_rate: float = 0.0
    broadcast_dropout: bool = False
    # Inside ``shard_map`` over this axis (ring attention on a caller's shards), the
    # functions were traced on block inputs varying over it, and are called so.
    axis_name: str | None = None

    def call_score_fn(self, s: jax.Array, idx: tuple, consts: tuple) -> jax.Array:
        return self.score_fn(*varying_inputs((s, *idx), self.axis_name), *consts)

    def call_mask_fn(self, idx: tuple, consts: tuple) -> jax.Array:
        return self.mask_fn(*varying_inputs(idx, self.axis_name), *consts)


def varying_inputs(args: Sequence[jax.Array], axis_name: str | None) -> list:
    """``args`` typed as varying over ``axis_name`` (unchanged for ``None``)."""
    if axis_name is None:
        return list(args)
    return [varying(jnp.asarray(x), axis_name) for x in args]


def varying(x: jax.Array, axis_name: str) -> jax.Array:
    """``x`` typed as varying over ``axis_name`` inside ``shard_map`` (as arrays derived
    from the shards are; constants are not)."""
    axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
    if axis_type is None or axis_name in axis_type.varying:
        return x
    return jax.lax.pcast(x, (axis_name,), to="varying")


def block_indices(kv_heads: int, groups: int, q_tok: Tokens, k_tok: Tokens) -> tuple:
    """``(batch [B, 1, 1, 1, 1], head [1, kv_heads, groups, 1, 1], q_pos [B, 1, 1, n, 1],
    kv_pos [B, 1, 1, 1, m])`` int32 of a block: what ``score_fn`` / ``mask_fn`` get."""
    batch = jnp.arange(q_tok.positions.shape[0], dtype=jnp.int32).reshape(-1, 1, 1, 1, 1)
    head = jnp.arange(kv_heads * groups, dtype=jnp.int32).reshape(1, kv_heads, groups, 1, 1)
    q_pos = q_tok.positions[:, None, None, :, None]
    kv_pos = k_tok.positions[:, None, None, None, :]
    return batch, head, q_pos, kv_pos


def convert(
    fn: Callable[..., jax.Array] | None,
    example: Sequence[Any],
) -> tuple[Callable[..., jax.Array] | None, tuple]:
    """``fn`` closure-converted at the block shapes of ``example``: ``(converted, consts)``,
    ``converted(*example_like, *consts)`` (``None`` stays ``None``)."""
    if fn is None:
        return None, ()
    converted, consts = jax.closure_convert(fn, *example)
    return converted, tuple(consts)


def example_block(kv_heads: int, groups: int, batch: int, n: int, m: int) -> tuple:
    """Zero arrays shaped as :func:`block_indices` gives them, for :func:`convert`."""
    tok = lambda length: Tokens(jnp.zeros((batch, length), jnp.int32))
    return block_indices(kv_heads, groups, tok(n), tok(m))


def logits(
    fns: BlockFunctions,
    scale: float,
    scores: jax.Array,
    bias: jax.Array | None,
    q_tok: Tokens,
    k_tok: Tokens,
    score_consts: tuple,
) -> jax.Array:
    """The float32 logits of a block from its raw ``q . k`` products ``[B, h, g, n, m]``:
    times ``scale``, plus ``bias``, through ``score_fn`` and the soft cap."""
    s = scores * jnp.float32(scale)
    if bias is not None:
        s = s + bias
    if fns.score_fn is not None:
        kv_heads, groups = s.shape[1:3]
        idx = block_indices(kv_heads, groups, q_tok, k_tok)
        s = jnp.broadcast_to(fns.call_score_fn(s, idx, score_consts), s.shape).astype(jnp.float32)
    if fns.soft_cap is not None:
        cap = jnp.float32(fns.soft_cap)
        s = cap * jnp.tanh(s / cap)
    return s


def apply_mask_fn(
    fns: BlockFunctions, shown: jax.Array, kv_heads: int, groups: int, q_tok, k_tok, consts
) -> jax.Array:
    """``shown`` (a block's boolean visibility) and ``mask_fn``'s."""
    if fns.mask_fn is None:
        return shown
    out = jnp.asarray(fns.call_mask_fn(block_indices(kv_heads, groups, q_tok, k_tok), consts))
    if out.dtype != jnp.bool_:
        checks.fail("mask_fn", f"must return booleans, got dtype {out.dtype}")
    return shown & out


def mask_fn_classes(
    fns: BlockFunctions,
    kv_heads: int,
    groups: int,
    q_tok: Tokens,
    k_tok: Tokens,
    consts: tuple,
    block_q: int,
    block_k: int,
) -> tuple[jax.Array, jax.Array]:
    """``(hidden, full)`` ``[nq, nk]`` bool: blocks ``mask_fn`` hides / shows entirely in
    every batch row and head, evaluated one ``[block_q, block_k]`` block at a time (never a
    ``q_len x kv_len`` array)."""
    nq = q_tok.positions.shape[1] // block_q
    nk = k_tok.positions.shape[1] // block_k

    def query_block(iq):
        q_blk = _slice_tokens(q_tok, iq * block_q, block_q)

        def key_block(jk):
            k_blk = _slice_tokens(k_tok, jk * block_k, block_k)
            idx = block_indices(kv_heads, groups, q_blk, k_blk)
            shown = jnp.asarray(fns.call_mask_fn(idx, consts))
            if shown.dtype != jnp.bool_:
                checks.fail("mask_fn", f"must return booleans, got dtype {shown.dtype}")
            return ~shown.any(), shown.all()

        return jax.lax.map(key_block, jnp.arange(nk, dtype=jnp.int32))

    hidden, full = jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))
    return hidden, full


def _slice_tokens(t: Tokens, start, size: int) -> Tokens:
    return t.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1))


# ------------------------------------------------------------------------- fused dropout

_GOLDEN = (0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F)


def _mix(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _u32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.uint32)


def seed_words(rng: jax.Array) -> jax.Array:
    """Two uint32 words drawn from a ``jax.random`` key: the fused dropout's seed."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_bits(
    seed: jax.Array, batch: jax.Array, head: jax.Array, q_index: jax.Array, k_index: jax.Array
) -> jax.Array:
    """uint32 hash of ``(seed, batch, head, query index, key index)``, broadcast."""
    row = _mix(seed[0] ^ _mix(_u32(batch) + jnp.uint32(_GOLDEN[0])))
    row = _mix(row ^ _mix(_u32(head) + jnp.uint32(_GOLDEN[1])))
    row = _mix(row ^ _mix(_u32(q_index) + jnp.uint32(_GOLDEN[2])))
    column = _mix(seed[1] ^ _mix(_u32(k_index) + jnp.uint32(_GOLDEN[3])))
    return _mix(row ^ column)


def _threshold(rate: float) -> jax.Array:
    """Bits below this keep: ``round((1 - rate) * 2**32)`` (clipped)."""
    return jnp.uint32(min(round((1.0 - rate) * 2.0**32), 2**32 - 1))


def keep(
    fns: BlockFunctions, seed: jax.Array | None, kv_heads: int, groups: int, q_tok, k_tok
) -> jax.Array | None:
    """A block's dropout keep mask ``[B or 1, h or 1, g or 1, n, m]`` (bool; ``None``
    without dropout). The kept weights' ``1 / (1 - rate)`` is left to the caller: it scales
    the output once (:func:`dropout_scale`). The token ``index`` (the global sequence index)
    and batch row locate the block."""
    if fns.dropout_rate == 0.0 or seed is None:
        return None
    if fns.broadcast_dropout:
        batch, head = jnp.int32(0), jnp.int32(0)
    else:
        batch, head, _, _ = block_indices(kv_heads, groups, q_tok, k_tok)
    bits = keep_bits(
        seed, batch, head, q_tok.index[:, None, None, :, None], k_tok.index[:, None, None, None, :]
    )
    return bits < _threshold(fns.dropout_rate)


def dropout_scale(fns: BlockFunctions) -> float:
    """``1 / (1 - rate)``: inverted dropout's scale of the kept weights (1 without)."""
    return 1.0 / (1.0 - fns.dropout_rate)


def dropout_keep_mask(
    rng: jax.Array,
    rate: float,
    batch_shape: Sequence[int],
    heads: int,
    q_len: int,
    kv_len: int,
    *,
    broadcast: bool = False,
) -> jax.Array:
    """The keep mask ``[*batch, heads, q_len, kv_len]`` (bool) that the fused-dropout
    kernels (``flash``, ``chunked``) realise for ``dropout_rng=rng`` and ``dropout_rate=
    rate``, whatever their block sizes: for checking them against a dense computation.

    Element ``(b, h, i, j)`` is kept when a 32-bit hash of the key, the flattened batch
    index ``b``, the query head ``h``, query ``i`` and key ``j`` falls below ``(1 - rate) *
    2**32`` (with ``broadcast``, ``b = h = 0`` for all).
    """
    if not 0.0 <= rate < 1.0:
        checks.fail("rate", f"expected a float in [0, 1), got {rate!r}")
    batch_shape = tuple(batch_shape)
    b = jnp.arange(int(np.prod(batch_shape)), dtype=jnp.int32).reshape(-1, 1, 1, 1)
    h = jnp.arange(heads, dtype=jnp.int32).reshape(1, -1, 1, 1)
    if broadcast:
        b, h = jnp.zeros_like(b), jnp.zeros_like(h)
    i = jnp.arange(q_len, dtype=jnp.int32).reshape(1, 1, -1, 1)
    j = jnp.arange(kv_len, dtype=jnp.int32).reshape(1, 1, 1, -1)
    bits = keep_bits(seed_words(rng), b, h, i, j)
    keep_mask = bits < _threshold(rate)
    return keep_mask.reshape(*batch_shape, heads, q_len, kv_len)


def combine_classes(classes: jax.Array, hidden: jax.Array, full: jax.Array) -> jax.Array:
    """Block classes of the visibility model refined by ``mask_fn``'s ``hidden`` / ``full``."""
    classes = jnp.where(hidden, vis.HIDDEN, classes)
    return jnp.where((classes == vis.FULL) & ~full, vis.PARTIAL, classes).astype(jnp.int32)
