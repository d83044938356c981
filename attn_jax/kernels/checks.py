"""Argument checks shared by the kernels' public boundaries.

Every failure raises :class:`AttentionInputError` whose message starts with the name of
the offending argument. Shape checks go through chex so the usual chex tooling applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AttentionInputError",
    "UnsupportedArgumentError",
    "check_broadcastable",
    "check_lengths",
    "check_qkv",
    "check_rank_at_least",
    "fail",
    "full_rank",
]


class AttentionInputError(ValueError, AssertionError):
    """Invalid argument to an attention kernel.

    A ``ValueError`` (a bad argument value) that is also an ``AssertionError`` (what chex
    assertions raise), so callers may catch either.
    """


class UnsupportedArgumentError(ValueError):
    """A kernel cannot honour an argument (a mask for a linear kernel, dropout for a fused
    kernel, ...). The message names the argument. With
    ``dot_product_attention(implementation=[...])`` it is the signal to try the next kernel.
    """


def fail(argument: str, message: str) -> NoReturn:
    """Raises :class:`AttentionInputError` with a message that starts with ``argument``."""
    raise AttentionInputError(f"argument {argument!r}: {message}")


def check_rank_at_least(x: jax.Array, rank: int, argument: str, layout: str) -> None:
    """Asserts ``x.ndim >= rank``; ``layout`` documents the expected axes."""
    try:
        chex.assert_rank(x, set(range(rank, max(rank, x.ndim) + 1)))
    except AssertionError:
        fail(argument, f"expected layout {layout} (rank >= {rank}), got shape {x.shape}")


def check_floating(x: jax.Array, argument: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        fail(argument, f"expected a floating-point array, got dtype {x.dtype}")


def check_qkv(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
    """Checks the ``[batch..., len, heads, head_dim]`` layout shared by the kernels.

    query: ``[batch..., q_len, heads, head_dim]``; key: ``[batch..., kv_len, kv_heads,
    head_dim]``; value: ``[batch..., kv_len, kv_heads, v_head_dim]``; ``heads`` must be a
    multiple of ``kv_heads``.
    """
    check_rank_at_least(query, 3, "query", "[batch..., q_len, heads, head_dim]")
    check_rank_at_least(key, 3, "key", "[batch..., kv_len, kv_heads, head_dim]")
    check_rank_at_least(value, 3, "value", "[batch..., kv_len, kv_heads, v_head_dim]")
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_floating(x, name)
    for name, x in (("key", key), ("value", value)):
        try:
            chex.assert_equal_rank([query, x])
        except AssertionError:
            fail(name, f"rank {x.ndim} (shape {x.shape}) differs from query's {query.shape}")
        try:
            chex.assert_equal_shape_prefix([query, x], query.ndim - 3)
        except AssertionError:
            fail(
                name,
                f"batch dimensions {x.shape[:-3]} differ from query's {query.shape[:-3]}",
            )
    if key.shape[-1] != query.shape[-1]:
        fail("key", f"head_dim {key.shape[-1]} does not match query head_dim {query.shape[-1]}")
    if value.shape[-3] != key.shape[-3]:
        fail("value", f"kv_len {value.shape[-3]} does not match key kv_len {key.shape[-3]}")
    if value.shape[-2] != key.shape[-2]:
        fail("value", f"kv_heads {value.shape[-2]} does not match key kv_heads {key.shape[-2]}")
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        fail(
            "key",
            f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})",
        )


def check_same_dtype(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
    """Key and value must have the query's dtype (pass ``dtype=`` to compute in one)."""
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            fail(
                name,
                f"dtype {x.dtype} differs from query dtype {query.dtype}; cast the inputs or "
                "pass dtype=",
            )


def full_rank(x: jax.Array, target: Sequence[int], argument: str) -> jax.Array:
    """``x`` reshaped to ``len(target)`` dimensions (leading 1s), after checking that it
    broadcasts to ``target`` without enlarging it."""
    target = tuple(target)
    try:
        ok = np.broadcast_shapes(tuple(x.shape), target) == target
    except ValueError:
        ok = False
    if not ok:
        fail(argument, f"shape {tuple(x.shape)} does not broadcast to {target}")
    return x.reshape((1,) * (len(target) - x.ndim) + tuple(x.shape))


def check_broadcastable(
    x: jax.Array | None, target: Sequence[int], argument: str, *, boolean: bool = False
) -> None:
    """Asserts ``x`` broadcasts to ``target`` without enlarging it."""
    if x is None:
        return
    if boolean and x.dtype != jnp.bool_:
        fail(
            argument,
            f"expected a boolean array (True = may attend), got dtype {x.dtype} (flax's mask "
            "helpers take dtype=bool; kernels.flax_attention_fn converts float masks)",
        )
    if not boolean and not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        fail(argument, f"expected a numeric array, got dtype {x.dtype}")
    full_rank(x, target, argument)


def check_lengths(lengths: jax.Array | None, batch_shape: Sequence[int], argument: str) -> None:
    """Asserts ``lengths`` is an integer array broadcastable to ``batch_shape``."""
    if lengths is None:
        return
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        fail(argument, f"expected an integer array, got dtype {lengths.dtype}")
    full_rank(lengths, batch_shape, argument)


def check_block_sizes(**sizes: Any) -> None:
    """Block or chunk sizes must be positive integers: ``check_block_sizes(block_q=64)``."""
    for name, size in sizes.items():
        if isinstance(size, bool | np.bool_) or not isinstance(size, int | np.integer) or size < 1:
            fail(name, f"expected a positive integer, got {size!r}")
