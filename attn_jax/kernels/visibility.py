"""Who sees whom: the one visibility model behind every attention kernel.

Query ``i`` may attend to key ``j`` when every one of these holds:

- both are *valid*: their index is below their sequence's valid length
  (``query_seq_lengths`` / ``key_value_seq_lengths``, right padding);
- they share a *segment* (``query_segment_ids`` / ``key_value_segment_ids``: packed
  sequences never attend across examples);
- *causal*: ``position(j) <= position(i)``;
- *window* ``(left, right)``: ``position(i) - left <= position(j) <= position(i) + right``;
- the dense boolean ``mask`` allows it.

Positions are absolute positions within each sequence, not array indices. By default key
``j`` sits at position ``j`` and query ``i`` at ``i + kv_len - q_len`` (``"bottom_right"``:
the last query lines up with the last key, what decoding with a KV cache needs), or at
``i`` with ``causal_alignment="top_left"`` (the alignment of ``jax.nn`` and flax; the two
agree when ``q_len == kv_len``). ``query_positions`` / ``key_value_positions`` give them
explicitly: a KV cache whose sequences have different lengths, a rolling cache.

:class:`Visibility` holds these facts as a pytree, built and checked once by the front end
(:func:`attn_jax.kernels.dot_product_attention`); :func:`visible` is the rule itself, the
only place it is written. Kernels consume it in their own form: :meth:`Visibility.dense_mask`
for dense kernels, :func:`block_classes` (hidden / partly / fully visible blocks) for
blockwise kernels, :meth:`Visibility.tokens` for the per-token view that ring attention
rotates with its key/value shards.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.kernels import checks

__all__ = [
    "ALIGNMENTS",
    "FULL",
    "HIDDEN",
    "PARTIAL",
    "Tokens",
    "Visibility",
    "block_classes",
    "build",
    "visible",
]

ALIGNMENTS = ("bottom_right", "top_left")
HIDDEN, PARTIAL, FULL = 0, 1, 2  # block classes
_BIG = np.int32(2**30)  # beyond any position (empty min / max)


def _static(default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tokens:
    """Per-token visibility of one side (queries or keys): arrays ``[*batch, n]``, where
    each batch dimension is either the full size or 1 (broadcast).

    Attributes:
      positions: int32 positions within the sequence.
      valid: bool, ``False`` for padding (``None``: all valid).
      segment_ids: int32 segment ids (``None``: one segment).
      index: int32 sequence indices ``[1 or B, n]`` (blockwise kernels: where each token
        sits in the whole sequence, which locates fused dropout), or ``None``.
    """

    positions: jax.Array
    valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    index: jax.Array | None = None

    def map(self, fn) -> Tokens:
        """Applies ``fn`` to every array (``None`` stays ``None``)."""
        return jax.tree.map(fn, self)


def visible(q: Tokens, k: Tokens, *, is_causal: bool, window: tuple[int, int] | None):
    """The visibility rule: ``[*batch, n, m]`` bool for queries ``q [*batch, n]`` and keys
    ``k [*batch, m]`` (without the dense mask, which is combined elementwise)."""
    qp, kp = q.positions[..., :, None], k.positions[..., None, :]
    ok = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if is_causal:
        ok &= kp <= qp
    if window is not None:
        left, right = window
        ok &= (kp >= qp - left) & (kp <= qp + right)
    if q.valid is not None:
        ok &= q.valid[..., :, None]
    if k.valid is not None:
        ok &= k.valid[..., None, :]
    if q.segment_ids is not None and k.segment_ids is not None:
        ok &= q.segment_ids[..., :, None] == k.segment_ids[..., None, :]
    return ok


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Visibility:
    """Who sees whom in one attention call (see the module docstring for the rule).

    Arrays have full rank (batch dimensions of size 1 broadcast): lengths ``[*batch]``,
    positions and segment ids ``[*batch, n]``, ``mask [*batch, heads, q_len, kv_len]``.

    Attributes:
      q_len, kv_len: sequence lengths (static).
      query_lengths, key_value_lengths: int32 valid lengths, or ``None``.
      query_positions, key_value_positions: explicit int32 positions, or ``None`` (the
        defaults of ``alignment``).
      query_segment_ids, key_value_segment_ids: int32 segment ids, or ``None``.
      mask: dense boolean mask, or ``None``.
      is_causal, window, alignment: static.
      batch_rank: the number of batch dimensions (static).
    """

    q_len: int = _static(0)
    kv_len: int = _static(0)
    query_lengths: jax.Array | None = None
    key_value_lengths: jax.Array | None = None
    query_positions: jax.Array | None = None
    key_value_positions: jax.Array | None = None
    query_segment_ids: jax.Array | None = None
    key_value_segment_ids: jax.Array | None = None
    mask: jax.Array | None = None
    is_causal: bool = _static(False)
    window: tuple[int, int] | None = _static(None)
    alignment: str = _static("bottom_right")
    batch_rank: int = _static(0)

    @property
    def explicit_positions(self) -> bool:
        return self.query_positions is not None or self.key_value_positions is not None

    @property
    def restricts(self) -> bool:
        """Whether anything is hidden at all."""
        return any(
            x is not None
            for x in (
                self.query_lengths,
                self.key_value_lengths,
                self.query_segment_ids,
                self.mask,
                self.window,
            )
        ) or bool(self.is_causal)

    @property
    def _only_structure(self) -> bool:
        """No lengths, segments, mask or explicit positions: visibility is static."""
        given = (
            self.query_lengths,
            self.key_value_lengths,
            self.query_segment_ids,
            self.key_value_segment_ids,
            self.mask,
            self.query_positions,
            self.key_value_positions,
        )
        return self.q_len > 0 and self.kv_len > 0 and all(x is None for x in given)

    @property
    def every_query_sees_a_key(self) -> bool:
        """Whether, statically, every query sees at least one key (default positions, no
        lengths, segments or mask): kernels then need not zero rows that see nothing."""
        if not self._only_structure:
            return False
        first, last = self.offset, self.offset + self.q_len - 1  # query positions
        if self.window is None:  # causal: query p sees keys 0 .. p
            return first >= 0 or not self.is_causal
        left, right = self.window
        if self.is_causal:
            right = min(right, 0)
        # Query p sees keys max(0, p - left) .. min(kv_len - 1, p + right).
        return first + right >= 0 and last - left <= self.kv_len - 1

    @property
    def every_key_is_seen(self) -> bool:
        """Whether, statically, every key is seen by at least one query (default positions,
        no lengths, segments or mask): kernels then need not zero the keys and values."""
        if not self._only_structure:
            return False
        first, last = self.offset, self.offset + self.q_len - 1  # query positions
        left, right = (self.kv_len, self.kv_len) if self.window is None else self.window
        if self.is_causal:
            right = min(right, 0)
        if left + right < 0:
            return False  # an empty window
        # The queries' windows p - left .. p + right, for consecutive p, cover one range.
        return first - left <= 0 and last + right >= self.kv_len - 1

    @property
    def offset(self) -> int:
        """The default position of query 0."""
        return self.kv_len - self.q_len if self.alignment == "bottom_right" else 0

    def tokens(
        self,
        q_index: jax.Array | None = None,
        kv_index: jax.Array | None = None,
    ) -> tuple[Tokens, Tokens]:
        """Per-token ``(queries, keys)``.

        ``q_index`` / ``kv_index`` (int32 ``[n]``) are the sequence indices of the tokens
        held (default ``0..len-1``): ring attention passes the indices of a device's shard,
        whose lengths and default positions then refer to the whole sequence of
        ``q_len`` / ``kv_len`` tokens. Explicit positions and segment ids are taken as
        given (they must already match the arrays held).
        """
        if q_index is None:
            q_index = jnp.arange(self.q_len, dtype=jnp.int32)
        if kv_index is None:
            kv_index = jnp.arange(self.kv_len, dtype=jnp.int32)
        rank = self.batch_rank
        q = _side(
            q_index + jnp.int32(self.offset),
            q_index,
            self.query_positions,
            self.query_lengths,
            self.query_segment_ids,
            rank,
        )
        k = _side(
            kv_index,
            kv_index,
            self.key_value_positions,
            self.key_value_lengths,
            self.key_value_segment_ids,
            rank,
        )
        return q, k

    def dense_mask(self) -> jax.Array | None:
        """``[*batch, heads or 1, q_len, kv_len]`` bool, or ``None`` when nothing is hidden."""
        if not self.restricts:
            return None
        q, k = self.tokens()
        ok = visible(q, k, is_causal=self.is_causal, window=self.window)[..., None, :, :]
        return ok if self.mask is None else ok & self.mask

    def reachable(self, kv_heads: int) -> tuple[jax.Array | None, jax.Array | None]:
        """``(queries [*batch, q_len, heads or 1, 1], keys [*batch, kv_len, kv_heads or 1,
        1])``: tokens that can see, or be seen by, anything (``None``: all of them).

        Kernels zero the others, so that whatever padding holds (NaN, inf) never reaches
        outputs or gradients. Exact for lengths, segments and the mask; for causal and
        window it uses the range of positions on the other side.
        """
        if not self.restricts:
            return None, None
        all_q, all_k = self.every_query_sees_a_key, self.every_key_is_seen
        if all_q and all_k:
            return None, None
        q, k = self.tokens()
        q_ok, k_ok = _valid(q), _valid(k)
        if q.segment_ids is not None and k.segment_ids is not None:
            q_ok &= _member(q.segment_ids, k.segment_ids, k_ok)
            k_ok &= _member(k.segment_ids, q.segment_ids, q_ok)
        if self.is_causal or self.window is not None:
            k_lo, k_hi = _valid_range(k.positions, k_ok)
            q_lo, q_hi = _valid_range(q.positions, q_ok)
            if self.window is None:  # causal: some key at or before / query at or after
                q_ok = q_ok & (q.positions >= k_lo)
                k_ok = k_ok & (k.positions <= q_hi)
            else:
                left, right = self.window
                right = min(right, 0) if self.is_causal else right
                q_ok = q_ok & (q.positions - left <= k_hi) & (q.positions + right >= k_lo)
                k_ok = k_ok & (k.positions <= q_hi + right) & (k.positions >= q_lo - left)
        # Nothing to see (or to be seen by) in the whole sequence.
        q_ok, k_ok = q_ok & k_ok.any(-1, keepdims=True), k_ok & q_ok.any(-1, keepdims=True)
        q_ok, k_ok = q_ok[..., None, None], k_ok[..., None, None]
        if self.mask is not None:
            rows = jnp.swapaxes(self.mask.any(-1), -1, -2)[..., None]  # [*b, q, h, 1]
            cols = self.mask.any(-2)  # [*b, h, kv]
            heads = cols.shape[-2]
            if heads > 1:
                cols = cols.reshape(*cols.shape[:-2], kv_heads, heads // kv_heads, -1).any(-2)
            cols = jnp.swapaxes(cols, -1, -2)[..., None]  # [*b, kv, kvh, 1]
            q_ok, k_ok = q_ok & rows, k_ok & cols
        return (None if all_q else q_ok), (None if all_k else k_ok)


def _side(default_positions, index, positions, lengths, segment_ids, rank: int) -> Tokens:
    """One side's :class:`Tokens`, every array of rank ``rank + 1``."""
    lead = (1,) * rank
    if positions is None:
        positions = default_positions.reshape(*lead, -1)
    valid = None if lengths is None else index.reshape(*lead, -1) < lengths[..., None]
    return Tokens(positions, valid, segment_ids)


def _valid(t: Tokens) -> jax.Array:
    """``[*batch, n]`` validity, materialised."""
    shape = t.positions.shape
    for x in (t.valid, t.segment_ids):
        if x is not None:
            shape = jnp.broadcast_shapes(shape, x.shape)
    ok = jnp.ones(shape, bool)
    return ok if t.valid is None else ok & t.valid


def _valid_range(positions: jax.Array, ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(min, max)`` of the valid positions per sequence, ``[*batch, 1]``."""
    lo = jnp.where(ok, positions, _BIG).min(-1, keepdims=True)
    hi = jnp.where(ok, positions, -_BIG).max(-1, keepdims=True)
    return lo, hi


def _member(x: jax.Array, pool: jax.Array, pool_ok: jax.Array) -> jax.Array:
    """``[*batch, n]``: whether each ``x`` occurs among the valid entries of ``pool
    [*batch, m]``, by sorting (never an ``n x m`` array)."""
    shape = jnp.broadcast_shapes(x.shape[:-1], pool.shape[:-1], pool_ok.shape[:-1])
    x = jnp.broadcast_to(x, (*shape, x.shape[-1]))
    pool = jnp.where(pool_ok, pool, _BIG)
    pool = jnp.broadcast_to(pool, (*shape, pool.shape[-1]))
    flat_x, flat_pool = x.reshape(-1, x.shape[-1]), jnp.sort(pool.reshape(-1, pool.shape[-1]))

    def one(values, table):
        index = jnp.clip(jnp.searchsorted(table, values), 0, table.shape[0] - 1)
        return table[index] == values

    return jax.vmap(one)(flat_x, flat_pool).reshape(x.shape)


# ----------------------------------------------------------------------- block classes


def _block_summary(t: Tokens, block: int):
    """Per block of ``block`` tokens (``t`` arrays ``[B, num_blocks * block]``, ``valid``
    materialised): any / all valid, and min / max of valid positions and segment ids,
    each ``[B, num_blocks]``."""
    split = lambda x: x.reshape(x.shape[0], -1, block)
    ok = split(t.valid)
    pos = split(t.positions)
    lo = jnp.where(ok, pos, _BIG).min(-1)
    hi = jnp.where(ok, pos, -_BIG).max(-1)
    seg = None
    if t.segment_ids is not None:
        s = split(t.segment_ids)
        seg = jnp.where(ok, s, _BIG).min(-1), jnp.where(ok, s, -_BIG).max(-1)
    return ok.any(-1), ok.all(-1), lo, hi, seg


def block_classes(
    q: Tokens,
    k: Tokens,
    mask: jax.Array | None,
    *,
    block_q: int,
    block_k: int,
    is_causal: bool,
    window: tuple[int, int] | None,
) -> jax.Array:
    """``[num_q_blocks, num_k_blocks]`` int32: :data:`HIDDEN` (no query of the block sees
    any key of it, in any batch row or head), :data:`FULL` (every one sees every one) or
    :data:`PARTIAL`.

    Args:
      q, k: tokens ``[B, n * block]`` with ``valid`` materialised (``False`` for the padding
        that fills the last block), positions and segment ids ``[B or 1, ...]``.
      mask: ``[B or 1, h or 1, g or 1, nq * block_q, nk * block_k]`` or ``None``.

    Conservative by construction: a block is only called hidden (skipped) or full (no mask
    evaluated) when that holds for every pair in it.
    """
    q_any, q_all, q_lo, q_hi, q_seg = _block_summary(q, block_q)
    k_any, k_all, k_lo, k_hi, k_seg = _block_summary(k, block_k)
    col = lambda x: x[:, :, None]  # query blocks
    row = lambda x: x[:, None, :]  # key blocks
    hidden = ~col(q_any) | ~row(k_any)
    full = col(q_all) & row(k_all)
    if is_causal:
        hidden |= row(k_lo) > col(q_hi)
        full &= row(k_hi) <= col(q_lo)
    if window is not None:
        left, right = window
        hidden |= (row(k_lo) > col(q_hi) + right) | (row(k_hi) < col(q_lo) - left)
        full &= (row(k_hi) <= col(q_lo) + right) & (row(k_lo) >= col(q_hi) - left)
    if q_seg is not None and k_seg is not None:
        (qs_lo, qs_hi), (ks_lo, ks_hi) = q_seg, k_seg
        hidden |= (col(qs_hi) < row(ks_lo)) | (row(ks_hi) < col(qs_lo))
        full &= (col(qs_lo) == col(qs_hi)) & (row(ks_lo) == row(ks_hi))
        full &= col(qs_lo) == row(ks_lo)
    if mask is not None:
        b, h, g, nq_bq, nk_bk = mask.shape
        m = mask.reshape(b, h * g, nq_bq // block_q, block_q, nk_bk // block_k, block_k)
        hidden |= ~m.any((1, 3, 5))
        full &= m.all((1, 3, 5))
    classes = jnp.where(full, FULL, PARTIAL)
    classes = jnp.where(hidden, HIDDEN, classes)
    # One class per block for the whole batch: hidden (full) only if hidden (full) in all.
    return jnp.where(
        (classes == HIDDEN).all(0), HIDDEN, jnp.where((classes == FULL).all(0), FULL, PARTIAL)
    ).astype(jnp.int32)


def visible_blocks(classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(order [nq, nk], count [nq])``: for each query block, the indices of its key blocks
    that are not hidden, in increasing order, first (then the hidden ones), and how many."""
    shown = classes != HIDDEN
    order = jnp.argsort(~shown, axis=1, stable=True).astype(jnp.int32)
    return order, shown.sum(1).astype(jnp.int32)


# --------------------------------------------------------------------- building and checks


def _as_int_array(x: Any, argument: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        checks.fail(argument, f"expected an integer array, got dtype {x.dtype}")
    return x.astype(jnp.int32)


def normalize_window(local_window_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``int`` or ``(left, right)`` non-negative ints -> ``(left, right)``; ``None`` stays."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, bool | np.bool_):
        checks.fail(
            "local_window_size", f"expected int or (left, right), got {local_window_size!r}"
        )
    if isinstance(local_window_size, int | np.integer):
        window = (int(local_window_size), int(local_window_size))
    else:
        window = tuple(local_window_size)
        if len(window) != 2 or not all(
            isinstance(w, int | np.integer) and not isinstance(w, bool) for w in window
        ):
            checks.fail(
                "local_window_size", f"expected int or (left, right), got {local_window_size}"
            )
        window = (int(window[0]), int(window[1]))
    if min(window) < 0:
        checks.fail("local_window_size", f"window sizes must be >= 0, got {window}")
    return window


def _build_arguments() -> tuple[str, ...]:
    return tuple(
        name
        for name, p in inspect.signature(build).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name != "mask"
    )


def build(
    batch_shape: Sequence[int],
    heads: int,
    q_len: int,
    kv_len: int,
    *,
    mask: Any = None,
    is_causal: bool = False,
    local_window_size: int | Sequence[int] | None = None,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    query_segment_ids: Any = None,
    key_value_segment_ids: Any = None,
    query_positions: Any = None,
    key_value_positions: Any = None,
    causal_alignment: str = "bottom_right",
) -> Visibility:
    """Checks the ``jax.nn``-style visibility arguments (errors name the argument) and
    builds the :class:`Visibility` of a call with ``batch_shape`` and ``heads`` query heads.

    Shapes: ``mask`` broadcasts to ``[*batch, heads, q_len, kv_len]`` (boolean); lengths to
    ``[*batch]``; segment ids and positions to ``[*batch, q_len]`` / ``[*batch, kv_len]``
    (integers). Segment ids come in pairs: ``key_value_segment_ids`` defaults to
    ``query_segment_ids`` when ``q_len == kv_len``.
    """
    batch_shape = tuple(batch_shape)
    if causal_alignment not in ALIGNMENTS:
        checks.fail("causal_alignment", f"expected one of {ALIGNMENTS}, got {causal_alignment!r}")
    if not isinstance(is_causal, bool | np.bool_):
        checks.fail("is_causal", f"expected a Python bool, got {is_causal!r}")
    if mask is not None:
        mask = jnp.asarray(mask)
        target = (*batch_shape, heads, q_len, kv_len)
        checks.check_broadcastable(mask, target, "mask", boolean=True)
        mask = checks.full_rank(mask, target, "mask")

    def lengths(x, argument):
        if x is None:
            return None
        return checks.full_rank(_as_int_array(x, argument), batch_shape, argument)

    def per_token(x, n, argument):
        if x is None:
            return None
        return checks.full_rank(_as_int_array(x, argument), (*batch_shape, n), argument)

    if key_value_segment_ids is None and query_segment_ids is not None:
        if q_len != kv_len:
            checks.fail(
                "key_value_segment_ids",
                f"required with query_segment_ids when q_len ({q_len}) != kv_len ({kv_len})",
            )
        key_value_segment_ids = query_segment_ids
    if query_segment_ids is None and key_value_segment_ids is not None:
        checks.fail("query_segment_ids", "required with key_value_segment_ids")
    return Visibility(
        q_len=int(q_len),
        kv_len=int(kv_len),
        query_lengths=lengths(query_seq_lengths, "query_seq_lengths"),
        key_value_lengths=lengths(key_value_seq_lengths, "key_value_seq_lengths"),
        query_positions=per_token(query_positions, q_len, "query_positions"),
        key_value_positions=per_token(key_value_positions, kv_len, "key_value_positions"),
        query_segment_ids=per_token(query_segment_ids, q_len, "query_segment_ids"),
        key_value_segment_ids=per_token(key_value_segment_ids, kv_len, "key_value_segment_ids"),
        mask=mask,
        is_causal=bool(is_causal),
        window=normalize_window(local_window_size),
        alignment=causal_alignment,
        batch_rank=len(batch_shape),
    )


# The jax.nn-style visibility arguments of :func:`build` (besides ``mask``).
BUILD_ARGUMENTS = _build_arguments()
