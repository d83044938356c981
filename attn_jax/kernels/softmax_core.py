"""The shared back half of every exact softmax kernel: logits -> weights -> output.

Scoring functions (dot product, additive, multiplicative) produce float32 logits
``[batch..., heads, q_len, kv_len]``; :func:`attend` applies bias, masks, the float32
softmax (whatever the input dtype), dropout and the weighted sum of values; fully-masked
query rows give zeros (output and weights) and finite gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.kernels import checks

if TYPE_CHECKING:
    from attn_jax.kernels.api import AttentionCall, AttentionOutput

# Large finite negative fill for masked logits (float32 softmax; -inf would give NaN rows,
# finfo.min could overflow to -inf after subtracting the row maximum).
MASK_VALUE = float(-0.7 * np.finfo(np.float32).max)


def group_query_heads(query: jax.Array, kv_heads: int) -> jax.Array:
    """``[..., q_len, heads, d]`` -> ``[..., q_len, kv_heads, heads // kv_heads, d]``.

    Query head ``h`` lands in group ``h // (heads // kv_heads)``, matching GQA's convention.
    """
    *lead, heads, dim = query.shape
    return query.reshape(*lead, kv_heads, heads // kv_heads, dim)


def fold_groups(query: jax.Array, kv_heads: int) -> jax.Array:
    """``[..., q_len, heads, d]`` -> ``[..., kv_heads, groups * q_len, d]``: the queries of
    each key/value head side by side (GQA's convention: query head ``h`` uses kv head
    ``h // groups``), so both attention matmuls of grouped-query attention are plain
    batched matmuls over kv heads (a separate group dimension in the contraction costs
    XLA CPU about 25%). With one query head per kv head the matmuls contract the inputs'
    own layout instead, as ``jax.nn`` does: the folded form is up to 1.3x faster forward
    on CPU, but its gradient 0.8x (measured at N = 512 to 2,048)."""
    *lead, q_len, heads, dim = query.shape
    grouped = query.reshape(*lead, q_len, kv_heads, heads // kv_heads, dim)
    return jnp.moveaxis(grouped, -4, -2).reshape(*lead, kv_heads, -1, dim)


def dot_logits(query: jax.Array, key: jax.Array, scale: float, precision: Any = None) -> jax.Array:
    """Scaled ``q . k`` logits in float32 (operands in their own dtype, float32
    accumulation).

    Args:
      query: ``[batch..., q_len, heads, d]``.
      key: ``[batch..., kv_len, kv_heads, d]``.

    Returns:
      ``[batch..., heads, q_len, kv_len]`` float32.
    """
    q_len, heads = query.shape[-3:-1]
    if heads == key.shape[-2]:  # one query per kv head: jax.nn's contraction, layout for layout
        logits = jnp.einsum(
            "...qhd,...khd->...hqk",
            query,
            key,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return logits * jnp.float32(scale)
    logits = jnp.einsum(
        "...hmd,...khd->...hmk",
        fold_groups(query, key.shape[-2]),
        key,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    logits = logits.reshape(*logits.shape[:-3], heads, q_len, logits.shape[-1])
    return logits * jnp.float32(scale)


def weighted_values(weights: jax.Array, value: jax.Array, precision: Any = None) -> jax.Array:
    """``weights [batch..., heads, q_len, kv_len]`` times ``value [batch..., kv_len,
    kv_heads, dv]`` -> ``[batch..., q_len, heads, dv]`` float32 (weights cast to the
    value dtype, float32 accumulation)."""
    *lead, heads, q_len, kv_len = weights.shape
    kv_heads = value.shape[-2]
    if heads == kv_heads:
        return jnp.einsum(
            "...hqk,...khd->...qhd",
            weights.astype(value.dtype),
            value,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
    out = jnp.einsum(
        "...hmk,...khd->...hmd",
        weights.astype(value.dtype).reshape(*lead, kv_heads, -1, kv_len),
        value,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    out = out.reshape(*lead, kv_heads, heads // kv_heads, q_len, out.shape[-1])
    return jnp.moveaxis(out, -2, -4).reshape(*lead, q_len, heads, out.shape[-1])


def dropout_weights(
    weights: jax.Array, rate: float, rng: jax.Array | None, *, broadcast: bool = False
) -> jax.Array:
    """Inverted dropout on attention weights ``[batch..., heads, q_len, kv_len]``.

    With ``broadcast`` (flax's ``broadcast_dropout``) one ``[q_len, kv_len]`` pattern is
    shared by every batch element and head.
    """
    if rng is None:
        raise checks.AttentionInputError(
            "argument 'dropout_rng': a jax.random key is required when dropout_rate > 0"
        )
    shape = (1,) * (weights.ndim - 2) + weights.shape[-2:] if broadcast else weights.shape
    keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


def attend(
    logits: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    broadcast_dropout: bool = False,
    out_dtype: Any = None,
    precision: Any = None,
    return_weights: bool = False,
    return_residual: bool = False,
    every_row_visible: bool = False,
    sinks: jax.Array | None = None,
    return_mass: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """Masked float32 softmax over keys, dropout, and the weighted sum of values.

    Args:
      logits: ``[batch..., heads, q_len, kv_len]`` float32 scores.
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias: additive, broadcastable to ``logits``.
      mask: boolean, broadcastable to ``logits``; ``True`` = may attend.
      dropout_rate, dropout_rng, broadcast_dropout: inverted dropout on the weights (with
        ``broadcast_dropout`` one pattern is shared across batch and heads, as in flax).
      out_dtype: dtype of the output (default: ``value.dtype``).
      return_weights: also return the weights, float32, before dropout (what flax sows).
      return_residual: also return the log-sum-exp ``[batch..., q_len, heads]``, float32
        (a large finite negative for fully-masked rows).
      every_row_visible: the caller knows every query row sees at least one key through
        ``mask``: rows need no zeroing (one pass over the weights less).
      sinks: ``[heads]`` float32 sink logits: one more logit per row, with no value.
      return_mass: also return the weights summed over queries, ``[batch..., heads,
        kv_len]`` float32.

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` output, followed by the weights, the
      residual and the mass, those asked for.
    """
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    if sinks is not None:  # the sink is one more column, dropped after the softmax
        sink_column = jnp.broadcast_to(sinks[:, None, None], (*logits.shape[:-1], 1))
        logits = jnp.concatenate([logits, sink_column.astype(jnp.float32)], axis=-1)
    # jax.nn.softmax: its custom derivative is one fused pass (a hand-written
    # exp / sum / divide differentiates into several).
    weights = jax.nn.softmax(logits, axis=-1)
    if sinks is not None:
        weights = weights[..., :-1]
    zero_rows = mask is not None and not every_row_visible
    if zero_rows:
        visible = jnp.any(mask, axis=-1, keepdims=True)
        weights = jnp.where(visible, weights, 0.0)
    applied = weights
    if dropout_rate > 0.0:
        applied = dropout_weights(weights, dropout_rate, dropout_rng, broadcast=broadcast_dropout)
    out = weighted_values(applied, value, precision)
    out = out.astype(value.dtype if out_dtype is None else out_dtype)

    extras: list[jax.Array] = []
    if return_weights:
        extras.append(weights)
    if return_residual:
        lse = jax.nn.logsumexp(logits, axis=-1)
        if zero_rows and sinks is None:
            lse = jnp.where(visible[..., 0], lse, MASK_VALUE)
        extras.append(jnp.moveaxis(lse, -2, -1))
    if return_mass:
        extras.append(jax.lax.stop_gradient(weights).sum(-2))
    return (out, *extras) if extras else out


def score_indices(call: AttentionCall) -> tuple[jax.Array, ...]:
    """``(batch, head, q_pos, kv_pos)`` int32 arrays that broadcast to the dense logits
    ``[*batch, heads, q_len, kv_len]`` of ``call``: what ``score_fn`` / ``mask_fn`` get."""
    batch_shape = call.batch_shape
    rank = len(batch_shape)
    q_tok, k_tok = call.visibility.tokens()
    batch = jnp.arange(int(np.prod(batch_shape)), dtype=jnp.int32).reshape(*batch_shape, 1, 1, 1)
    head = jnp.arange(call.heads, dtype=jnp.int32).reshape(*(1,) * rank, -1, 1, 1)
    q_pos = q_tok.positions[..., None, :, None]
    kv_pos = k_tok.positions[..., None, None, :]
    return batch, head, q_pos, kv_pos


def final_logits(call: AttentionCall, logits: jax.Array) -> jax.Array:
    """``logits`` (float32 ``q . k * scale``) plus the bias, through ``score_fn`` and the
    soft cap: the logits the softmax of ``call`` takes (before masking)."""
    if call.bias is not None:
        logits = logits + call.bias.astype(jnp.float32)
    if call.score_fn is not None:
        logits = call.score_fn(logits, *score_indices(call)).astype(jnp.float32)
        logits = jnp.broadcast_to(logits, (*call.batch_shape, call.heads, *logits.shape[-2:]))
    return soft_cap(logits, call.logits_soft_cap)


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)`` (``cap=None``: ``logits``)."""
    if cap is None:
        return logits
    return jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))


def dense_visibility(call: AttentionCall) -> jax.Array | None:
    """The dense boolean mask of ``call``: its visibility and ``mask_fn``."""
    mask = call.visibility.dense_mask()
    if call.mask_fn is None:
        return mask
    shown = call.mask_fn(*score_indices(call))
    if not jnp.issubdtype(jnp.asarray(shown).dtype, jnp.bool_):
        checks.fail("mask_fn", f"must return booleans, got dtype {jnp.asarray(shown).dtype}")
    return shown if mask is None else mask & shown


def attend_call(call: AttentionCall, logits: jax.Array, value: jax.Array) -> AttentionOutput:
    """:func:`attend` with the bias, score function, soft cap, visibility (as a dense mask),
    sinks, dropout, dtypes and requested outputs of a validated ``call``."""
    from attn_jax.kernels.api import AttentionOutput

    mask = dense_visibility(call)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], *logits.shape[-2:]))
    outputs = attend(
        final_logits(call, logits),
        value,
        mask=mask,
        sinks=call.sinks,
        return_mass=call.return_attention_mass,
        dropout_rate=call.dropout_rate,
        dropout_rng=call.dropout_rng,
        broadcast_dropout=call.broadcast_dropout,
        out_dtype=call.out_dtype,
        precision=call.precision,
        return_weights=call.return_weights,
        return_residual=call.return_residual,
        every_row_visible=call.visibility.every_query_sees_a_key and call.mask_fn is None,
    )
    out, *extras = outputs if isinstance(outputs, tuple) else (outputs,)
    weights = extras.pop(0) if call.return_weights else None
    residual = extras.pop(0) if call.return_residual else None
    mass = extras.pop(0) if call.return_attention_mass else None
    return AttentionOutput(out, residual, weights, mass)


def logits_shape(
    batch_shape: Sequence[int], heads: int, q_len: int, kv_len: int
) -> tuple[int, ...]:
    """``[batch..., heads, q_len, kv_len]`` as a tuple."""
    return (*batch_shape, heads, q_len, kv_len)
