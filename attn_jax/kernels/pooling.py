"""Attention pooling: a weighted average over the sequence ("weighted attention")."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax import masks
from attn_jax.kernels import checks, softmax_core
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["attention_pooling"]


@register(
    "pooling",
    capabilities=Capabilities(mask=True, gqa=True, weights=True, interface="pooling"),
)
def attention_pooling(
    value: jax.Array,
    *,
    query: jax.Array | None = None,
    key: jax.Array | None = None,
    scores: jax.Array | None = None,
    mask: jax.Array | None = None,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Pools ``value`` over its sequence axis with softmax weights.

    The weights come either from a (learned) ``query`` scored against ``key`` — scaled dot
    product, as in a transformer's pooling head — or directly from per-position ``scores``
    (e.g. ``w . tanh(W x)`` computed by a model). Exactly one of ``query`` / ``scores``.

    Args:
      value: ``[batch..., length, kv_heads, v_dim]``.
      query: ``[heads, d]`` (one learned query per head, shared across the batch) or
        ``[batch..., heads, d]``.
      key: ``[batch..., length, kv_heads, d]``; defaults to ``value`` (an error with
        ``scores``).
      scores: ``[batch..., length, heads]`` unnormalised per-position scores.
      mask: ``[batch..., length]`` boolean, True at valid (non-padding) positions.
      lengths: ``[batch...]`` integer valid lengths (alternative to ``mask``).
      scale: logit scale for ``query``; default ``1 / sqrt(d)`` (an error with ``scores``).
      return_weights: also return float32 weights ``[batch..., heads, length]``.

    Returns:
      ``[batch..., heads, v_dim]`` pooled features in ``value``'s dtype (zeros for a fully
      padded sequence), and
      the weights when requested.
    """
    value = jnp.asarray(value)
    checks.check_rank_at_least(value, 3, "value", "[batch..., length, kv_heads, v_dim]")
    checks.check_floating(value, "value")
    batch_shape, length, kv_heads = value.shape[:-3], value.shape[-3], value.shape[-2]
    if (query is None) == (scores is None):
        raise checks.AttentionInputError(
            "argument 'query': pass exactly one of 'query' (learned query) or 'scores'"
        )
    if scores is not None:
        if scale is not None or key is not None:
            unused = "scale" if scale is not None else "key"
            raise checks.AttentionInputError(
                f"argument {unused!r}: only used with 'query', not with precomputed 'scores'"
            )
        scores = jnp.asarray(scores)
        checks.check_floating(scores, "scores")
        if scores.shape[:-1] != (*batch_shape, length) or scores.shape[-1] % kv_heads:
            raise checks.AttentionInputError(
                f"argument 'scores': expected [batch..., length, heads] = "
                f"{(*batch_shape, length)} + (heads,), got {scores.shape}"
            )
        logits = jnp.moveaxis(scores.astype(jnp.float32), -1, -2)[..., None, :]
    else:
        key = value if key is None else jnp.asarray(key)
        query = jnp.asarray(query)
        checks.check_rank_at_least(query, 2, "query", "[heads, d] or [batch..., heads, d]")
        heads, dim = query.shape[-2:]
        if query.shape[:-2] not in ((), tuple(batch_shape)):
            raise checks.AttentionInputError(
                f"argument 'query': expected [heads, d] or [batch..., heads, d] with batch "
                f"{tuple(batch_shape)}, got {query.shape}"
            )
        query = jnp.broadcast_to(query, (*batch_shape, heads, dim))[..., None, :, :]
        checks.check_qkv(query, key, value)
        if scale is None:
            scale = 1.0 / math.sqrt(dim)
        logits = softmax_core.dot_logits(query, key, scale)
    heads = logits.shape[-3]

    valid = None
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_ or mask.shape != (*batch_shape, length):
            raise checks.AttentionInputError(
                f"argument 'mask': expected boolean [batch..., length] = "
                f"{(*batch_shape, length)}, got {mask.dtype} {mask.shape}"
            )
        valid = mask
    if lengths is not None:
        checks.check_lengths(lengths, batch_shape, "lengths")
        valid = masks.combine_masks(valid, masks.lengths_to_mask(lengths, length))
    if valid is not None:
        valid = valid[..., None, None, :]  # [batch..., 1 (heads), 1 (q_len), length]

    out, weights = softmax_core.attend(
        logits,
        value,
        mask=valid,
        out_dtype=value.dtype,
        return_weights=True,
    )
    out = out[..., 0, :, :]
    weights = weights[..., 0, :].reshape(*batch_shape, heads, length)
    return (out, weights) if return_weights else out
