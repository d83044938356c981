"""Score and mask functions for the ``score_fn`` / ``mask_fn`` arguments of the kernels.

Each constructor returns a function of the kernels' contract:

- ``mask_fn(batch, head, q_pos, kv_pos) -> bool`` (True = may attend);
- ``score_fn(score, batch, head, q_pos, kv_pos) -> score``.

The arguments are arrays that broadcast against each other (and against ``score``, the
float32 logits) to the shape of the logits being computed: ``[*batch, heads, q_len,
kv_len]``-shaped in the dense kernel, a ``[B, kv_heads, groups, block_q, block_k]`` block
in the blockwise ones. Their ranks are not part of the contract, so every function here is
elementwise: broadcasting ``jnp`` operations and lookups such as ``table[head, bucket]`` or
``ids[batch, q_pos]``. ``batch`` is the row-major flattened batch index, ``head`` the query
head, ``q_pos`` / ``kv_pos`` the positions of the visibility model (a query decoded from a
cache sits at its place in the sequence). Arrays a function closes over (ALiBi slopes, a
T5 table) get gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "alibi",
    "alibi_slopes",
    "all_of",
    "any_of",
    "bigbird_mask",
    "chain_scores",
    "dilated_mask",
    "document_mask",
    "global_tokens_mask",
    "prefix_lm_mask",
    "strided_mask",
    "t5_relative_bias",
    "t5_relative_position_bucket",
]

MaskFn = Callable[..., jax.Array]
ScoreFn = Callable[..., jax.Array]


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"argument {name!r}: expected a positive integer, got {value!r}")
    return value


def _non_negative_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"argument {name!r}: expected an integer >= 0, got {value!r}")
    return value


# ------------------------------------------------------------------------ score functions


def alibi_slopes(heads: int) -> jax.Array:
    """ALiBi's head slopes ``[heads]`` (Press et al. 2022): ``2^(-8 i / n)`` for ``i = 1..n``
    when ``heads = n`` is a power of two; otherwise those of the largest power of two below
    ``heads``, followed by every other slope of the next power of two (the paper's recipe)."""
    _positive_int(heads, "heads")

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(heads))
    slopes = powers(base)
    if base < heads:
        slopes += powers(2 * base)[0::2][: heads - base]
    return jnp.asarray(slopes, jnp.float32)


def alibi(slopes: jax.Array, *, causal: bool = True) -> ScoreFn:
    """ALiBi: ``score - slopes[head] * (q_pos - kv_pos)`` (``causal``), or ``- slopes[head]
    * |q_pos - kv_pos|`` (bidirectional). ``slopes [heads]`` may be learned."""
    slopes = jnp.asarray(slopes)
    if slopes.ndim != 1:
        raise ValueError(f"argument 'slopes': expected shape [heads], got {slopes.shape}")

    def score_fn(score, batch, head, q_pos, kv_pos):
        distance = (q_pos - kv_pos).astype(jnp.float32)
        if not causal:
            distance = jnp.abs(distance)
        return score - slopes[head].astype(jnp.float32) * distance

    return score_fn


def t5_relative_position_bucket(
    relative_position: jax.Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5's bucket of ``relative_position = kv_pos - q_pos`` (int32, any shape): exact
    buckets for small distances, logarithmic ones up to ``max_distance``, as in T5 and
    flaxformer. Bidirectional: half the buckets for keys after the query."""
    _positive_int(num_buckets, "num_buckets")
    _positive_int(max_distance, "max_distance")
    n = -jnp.asarray(relative_position).astype(jnp.int32)  # query minus key
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


def t5_relative_bias(
    table: jax.Array, *, bidirectional: bool = True, max_distance: int = 128
) -> ScoreFn:
    """``score + table[head, bucket(kv_pos - q_pos)]``: T5's relative-position bias from a
    (learned) ``table [heads, num_buckets]``."""
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(
            f"argument 'table': expected shape [heads, num_buckets], got {table.shape}"
        )
    num_buckets = table.shape[1]

    def score_fn(score, batch, head, q_pos, kv_pos):
        bucket = t5_relative_position_bucket(
            kv_pos - q_pos,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
        return score + table[head, bucket].astype(jnp.float32)

    return score_fn


def chain_scores(*score_fns: ScoreFn) -> ScoreFn:
    """The score functions applied in order."""
    if not score_fns:
        raise ValueError("argument 'score_fns': expected at least one score function")

    def score_fn(score, batch, head, q_pos, kv_pos):
        for fn in score_fns:
            score = fn(score, batch, head, q_pos, kv_pos)
        return score

    return score_fn


# ------------------------------------------------------------------------- mask functions


def document_mask(document_ids: jax.Array) -> MaskFn:
    """Tokens see only their own document: ``ids[batch, q_pos] == ids[batch, kv_pos]``, with
    ``document_ids [batch, seq_len]`` indexed by position (so it holds when decoding)."""
    ids = jnp.asarray(document_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            "argument 'document_ids': expected integers [batch, seq_len], got "
            f"{ids.dtype}{ids.shape}"
        )
    return lambda batch, head, q_pos, kv_pos: ids[batch, q_pos] == ids[batch, kv_pos]


def prefix_lm_mask(prefix_lengths: jax.Array | int) -> MaskFn:
    """Prefix LM: bidirectional within each sequence's prefix, causal after it:
    ``kv_pos <= q_pos | kv_pos < prefix_lengths[batch]`` (a scalar: the same for all)."""
    lengths = jnp.asarray(prefix_lengths)
    if lengths.ndim > 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"argument 'prefix_lengths': expected an integer or integers [batch], got "
            f"{lengths.dtype}{lengths.shape}"
        )

    def mask_fn(batch, head, q_pos, kv_pos):
        prefix = lengths if lengths.ndim == 0 else lengths[batch]
        return (kv_pos <= q_pos) | (kv_pos < prefix)

    return mask_fn


def dilated_mask(dilation: int, *, window: int | None = None, causal: bool = False) -> MaskFn:
    """Dilated attention: ``(q_pos - kv_pos) % dilation == 0``, within ``|q_pos - kv_pos| <=
    window`` if given, and ``kv_pos <= q_pos`` if ``causal``."""
    _positive_int(dilation, "dilation")
    if window is not None:
        _non_negative_int(window, "window")

    def mask_fn(batch, head, q_pos, kv_pos):
        distance = q_pos - kv_pos
        ok = distance % dilation == 0
        if window is not None:
            ok &= jnp.abs(distance) <= window
        if causal:
            ok &= distance >= 0
        return ok

    return mask_fn


def strided_mask(stride: int, *, causal: bool = True) -> MaskFn:
    """The Sparse Transformer's strided pattern (Child et al. 2019): the previous ``stride``
    positions and every ``stride``-th one before them: ``0 <= q_pos - kv_pos < stride`` or
    ``(q_pos - kv_pos) % stride == 0`` (without ``causal``, both directions)."""
    _positive_int(stride, "stride")

    def mask_fn(batch, head, q_pos, kv_pos):
        distance = q_pos - kv_pos
        if not causal:
            distance = jnp.abs(distance)
        return (distance >= 0) & ((distance < stride) | (distance % stride == 0))

    return mask_fn


def global_tokens_mask(num_global: int, window: int) -> MaskFn:
    """Longformer: a local window ``|q_pos - kv_pos| <= window`` plus ``num_global`` global
    tokens (the first positions) that see and are seen by every token."""
    _non_negative_int(num_global, "num_global")
    _non_negative_int(window, "window")
    return lambda batch, head, q_pos, kv_pos: (
        (jnp.abs(q_pos - kv_pos) <= window) | (q_pos < num_global) | (kv_pos < num_global)
    )


def bigbird_mask(
    rng: jax.Array,
    seq_len: int,
    *,
    block_size: int,
    num_random_blocks: int,
    window_blocks: int = 1,
    num_global_blocks: int = 1,
) -> MaskFn:
    """BigBird's block pattern (Zaheer et al. 2020) over ``seq_len`` positions in blocks of
    ``block_size``: a query block sees the key blocks within ``window_blocks`` of it, the
    first ``num_global_blocks`` blocks (which also see everything), and
    ``num_random_blocks`` random key blocks, drawn once from ``rng`` into a table
    ``[num_blocks, num_random_blocks]`` (the same key gives the same pattern)."""
    _positive_int(seq_len, "seq_len")
    _positive_int(block_size, "block_size")
    _non_negative_int(num_random_blocks, "num_random_blocks")
    _non_negative_int(window_blocks, "window_blocks")
    _non_negative_int(num_global_blocks, "num_global_blocks")
    num_blocks = -(-seq_len // block_size)
    if num_random_blocks > num_blocks:
        raise ValueError(
            f"argument 'num_random_blocks': at most the {num_blocks} blocks, "
            f"got {num_random_blocks}"
        )
    keys = jax.random.split(rng, num_blocks)
    table = jax.vmap(
        lambda key: jax.random.choice(key, num_blocks, (num_random_blocks,), replace=False)
    )(keys).astype(jnp.int32)

    def mask_fn(batch, head, q_pos, kv_pos):
        qb, kb = q_pos // block_size, kv_pos // block_size
        ok = (jnp.abs(qb - kb) <= window_blocks) | (qb < num_global_blocks)
        ok |= kb < num_global_blocks
        rows = table[jnp.clip(qb, 0, num_blocks - 1)]  # [..., num_random_blocks]
        for r in range(num_random_blocks):
            ok |= rows[..., r] == kb
        return ok

    mask_fn.random_blocks = table  # type: ignore[attr-defined]
    return mask_fn


def all_of(*mask_fns: MaskFn) -> MaskFn:
    """Visible where every mask function shows."""
    if not mask_fns:
        raise ValueError("argument 'mask_fns': expected at least one mask function")

    def mask_fn(batch, head, q_pos, kv_pos):
        ok = mask_fns[0](batch, head, q_pos, kv_pos)
        for fn in mask_fns[1:]:
            ok = ok & fn(batch, head, q_pos, kv_pos)
        return ok

    return mask_fn


def any_of(*mask_fns: MaskFn) -> MaskFn:
    """Visible where any mask function shows."""
    if not mask_fns:
        raise ValueError("argument 'mask_fns': expected at least one mask function")

    def mask_fn(batch, head, q_pos, kv_pos):
        ok = mask_fns[0](batch, head, q_pos, kv_pos)
        for fn in mask_fns[1:]:
            ok = ok | fn(batch, head, q_pos, kv_pos)
        return ok

    return mask_fn
