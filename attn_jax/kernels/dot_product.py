"""Scaled dot-product attention: the exact reference kernel of attn_jax."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import checks, softmax_core
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["dot_product_attention", "prepare_softmax_inputs", "validate_softmax_inputs"]


def validate_softmax_inputs(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    local_window_size: int | Sequence[int] | None,
    query_seq_lengths: jax.Array | None,
    key_value_seq_lengths: jax.Array | None,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None, Any, Any]:
    """Checks the arguments shared by softmax kernels (errors name the argument).

    ``query`` / ``key`` / ``value`` follow ``[batch..., len, heads, dim]``; ``bias`` and
    ``mask`` broadcast to ``[batch..., heads, q_len, kv_len]``; lengths are ``[batch...]``.
    Without ``dtype``, query, key and value must share one dtype.

    Returns:
      ``(query, key, value, bias, mask, window, out_dtype)`` as arrays, the window as
      ``(left, right)`` or ``None``.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    bias = None if bias is None else jnp.asarray(bias)
    mask = None if mask is None else jnp.asarray(mask)
    checks.check_qkv(query, key, value)
    batch_shape = query.shape[:-3]
    target = softmax_core.logits_shape(batch_shape, query.shape[-2], query.shape[-3], key.shape[-3])
    checks.check_broadcastable(bias, target, "bias")
    checks.check_broadcastable(mask, target, "mask", boolean=True)
    checks.check_lengths(query_seq_lengths, batch_shape, "query_seq_lengths")
    checks.check_lengths(key_value_seq_lengths, batch_shape, "key_value_seq_lengths")
    window = checks.normalize_window(local_window_size)
    if dtype is None:
        checks.check_same_dtype(query, key, value)
    out_dtype = query.dtype if dtype is None else jnp.dtype(dtype)
    return query, key, value, bias, mask, window, out_dtype


def prepare_softmax_inputs(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    is_causal: bool,
    local_window_size: int | Sequence[int] | None,
    query_seq_lengths: jax.Array | None,
    key_value_seq_lengths: jax.Array | None,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None, Any]:
    """Validates the shared arguments of softmax kernels (:func:`validate_softmax_inputs`)
    and combines every mask.

    Returns:
      ``(query, key, value, bias, combined_mask, out_dtype)`` with inputs cast to ``dtype``
      when given.
    """
    query, key, value, bias, mask, window, out_dtype = validate_softmax_inputs(
        query,
        key,
        value,
        bias,
        mask,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        dtype=dtype,
    )
    q_len, kv_len = query.shape[-3], key.shape[-3]
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    combined = softmax_core.build_mask(
        mask,
        q_len=q_len,
        kv_len=kv_len,
        is_causal=bool(is_causal),
        local_window_size=window,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
    )
    return query, key, value, bias, combined, out_dtype


@register(
    "dot_product",
    capabilities=Capabilities(
        mask=True,
        bias=True,
        causal=True,
        window=True,
        seq_lengths=True,
        dropout=True,
        gqa=True,
        weights=True,
        residual=True,
    ),
)
def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    broadcast_dropout: bool = False,
    dtype: Any = None,
    precision: Any = None,
    return_weights: bool = False,
    return_residual: bool = False,
    deterministic: bool = False,
    module: Any = None,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """Scaled dot-product attention ``softmax(q k^T * scale + bias) v`` (exact).

    Drop-in for ``jax.nn.dot_product_attention`` and ``flax.linen.dot_product_attention``
    (same layouts), with bottom-right causal alignment.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]``; ``heads % kv_heads == 0`` (GQA/MQA:
        query head ``h`` uses kv head ``h // (heads // kv_heads)``).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias: additive logits bias broadcastable to ``[batch..., heads, q_len, kv_len]``.
      mask: boolean, broadcastable to ``[batch..., heads, q_len, kv_len]``; True = attend.
      scale: logit scale; default ``1 / sqrt(head_dim)``.
      is_causal: query ``i`` sees keys ``j <= i + (kv_len - q_len)`` (bottom-right).
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys within
        ``[i' - left, i' + right]`` where ``i' = i + kv_len - q_len``.
      query_seq_lengths: ``[batch...]`` integer valid query lengths (padded rows -> 0).
      key_value_seq_lengths: ``[batch...]`` integer valid key/value lengths.
      dropout_rate: dropout on the attention weights; needs ``dropout_rng``.
      dropout_rng: ``jax.random`` key for dropout.
      broadcast_dropout: share the dropout pattern across batch dimensions (flax).
      dtype: compute/output dtype (default: the query's dtype for the output).
      precision: ``jax.lax.Precision`` for the two matmuls.
      return_weights: also return float32 weights ``[batch..., heads, q_len, kv_len]``.
      return_residual: also return the float32 log-sum-exp ``[batch..., q_len, heads]``.
      deterministic: turn dropout off (flax's ``attention_fn`` convention).
      implementation: accepted for ``jax.nn`` compatibility: ``None`` or ``"xla"`` (this
        kernel is plain XLA); ``"cudnn"`` raises.
      module: a flax module to ``sow`` the weights into as ``('intermediates',
        'attention_weights')``; flax passes it when called with ``sow_weights=True``. With
        ``deterministic`` and ``module`` this function can be passed directly as
        ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` (masks must then be
        boolean: ``nn.make_attention_mask(..., dtype=bool)``, or use
        :func:`attn_jax.kernels.flax_attention_fn`, which converts flax's float masks).

    Returns:
      ``[batch..., q_len, heads, v_head_dim]``, then weights and/or residual if requested.
      Query rows with no visible key give zeros (and zero weights).
    """
    if implementation not in (None, "xla"):
        raise checks.AttentionInputError(
            f"argument 'implementation': {implementation!r} is not available; this kernel is "
            "plain XLA (None or 'xla'); see kernels.available() for others"
        )
    dropout_rate = 0.0 if deterministic else softmax_core.dropout_rate_value(dropout_rate)
    query, key, value, bias, combined, out_dtype = prepare_softmax_inputs(
        query,
        key,
        value,
        bias,
        mask,
        is_causal=is_causal,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        dtype=dtype,
    )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    logits = softmax_core.dot_logits(query, key, scale, precision)
    outputs = softmax_core.attend(
        logits,
        value,
        bias=bias,
        mask=combined,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        broadcast_dropout=broadcast_dropout,
        out_dtype=out_dtype,
        precision=precision,
        return_weights=return_weights or module is not None,
        return_residual=return_residual,
    )
    if module is None:
        return outputs
    module.sow("intermediates", "attention_weights", outputs[1])
    if not return_weights:
        outputs = (outputs[0], *outputs[2:])
    return outputs if len(outputs) > 1 else outputs[0]
