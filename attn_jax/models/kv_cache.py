"""The decoding caches of :class:`~attn_jax.models.MultiHeadAttention`, one per decode form
of the kernels (:data:`attn_jax.kernels.registry.DECODE_FORMS`).

- ``kv_cache``: every key/value so far, head-major ``[batch, kv_heads, max_len, dim]``,
  read by the kernel (as ``[batch, max_len, kv_heads, dim]``, :func:`tokens_major`) with
  per-sequence query positions and valid lengths (dense and blockwise kernels): causal
  and window masks are right at every step. Slots past a sequence's length hold zeros.
- ``rolling_cache``: the last ``left + 1`` positions of a sliding window, with their
  positions, ``[batch, left + 1, kv_heads, dim]``: memory O(window), not O(max_len).
- ``recurrent``: the running sums of a feature-map kernel (linear, Performer): O(1)
  memory in the sequence length, a per-token cost independent of it.

Every cache tracks ``cache_lengths [batch]``, so sequences of different lengths (ragged
prompts) decode together. The functions here are pure: they take the cache arrays and
return new ones; the layer keeps them in its ``'cache'`` collection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["EMPTY", "append_kv", "roll_in", "rolling_slots", "tokens_major"]

EMPTY = 2**30  # the position of an empty rolling slot: after every query, so never seen


def append_kv(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new [batch, n, kv_heads, dim]`` into the head-major ``cache [batch,
    kv_heads, max_len, dim]`` at each sequence's own offset ``start [batch]``.

    Head-major because that is the layout the ``q k^T`` and ``p v`` contractions read:
    a token-major cache is transposed whole at every decoding step (6x slower per layer
    at batch 8 on CPU).
    """
    zero = jnp.int32(0)
    write = lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (zero, s.astype(jnp.int32), zero))
    return jax.vmap(write)(cache, jnp.swapaxes(new, 1, 2).astype(cache.dtype), start)


def tokens_major(*caches: jax.Array) -> tuple[jax.Array, ...]:
    """Head-major caches ``[batch, kv_heads, max_len, dim]`` in the kernels' layout
    ``[batch, max_len, kv_heads, dim]`` (XLA folds the transposition into the reads)."""
    return tuple(jnp.swapaxes(c, 1, 2) for c in caches)


def rolling_slots(max_len: int, window: tuple[int, int] | None) -> int:
    """Slots of a rolling cache: ``left + 1`` positions for a window ``(left, right)``
    (the query's own and the ``left`` before it), all of ``max_len`` without a window."""
    if window is None:
        return max_len
    return max(1, min(window[0] + 1, max_len))


def roll_in(
    keys: jax.Array, values: jax.Array, positions: jax.Array, slots: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rolling cache after new entries: from the ``slots`` old entries followed by the
    new ones (``keys / values [batch, slots + n, ...]``, ``positions [batch, slots + n]``,
    :data:`EMPTY` for nothing), slot ``s`` keeps the latest position ``p`` with
    ``p % slots == s``.

    Returns ``(keys, values, positions)`` of ``slots`` entries.
    """
    present = positions != EMPTY
    slot = jnp.where(present, positions % slots, -1)  # [batch, slots + n]
    here = slot[:, None, :] == jnp.arange(slots, dtype=slot.dtype)[None, :, None]
    score = jnp.where(here, positions[:, None, :], -1)  # [batch, slots, slots + n]
    pick = jnp.argmax(score, axis=-1)  # [batch, slots]
    found = jnp.max(score, axis=-1) >= 0
    take = lambda x: jnp.take_along_axis(x, pick.reshape(*pick.shape, *(1,) * (x.ndim - 2)), 1)
    new_positions = jnp.where(found, jnp.take_along_axis(positions, pick, 1), EMPTY)
    return take(keys), take(values), new_positions.astype(positions.dtype)
