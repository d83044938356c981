"""Multiplicative (Luong) attention with the ``dot`` and ``general`` scores."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import api, checks, softmax_core
from attn_jax.kernels.registry import EVERY_FEATURE, Capabilities, register

__all__ = ["SCORES", "multiplicative_attention"]

SCORES = ("dot", "general")


def _project_query(query: jax.Array, weight: jax.Array, d_k: int, precision: Any) -> jax.Array:
    """``q W``: ``[batch..., q_len, heads, d_q]`` x ``[heads, d_q, d_k]`` -> ``[..., d_k]``."""
    heads, d_q = query.shape[-2], query.shape[-1]
    if weight.ndim == 2:
        weight = jnp.broadcast_to(weight, (heads, *weight.shape))
    if weight.ndim != 3 or weight.shape != (heads, d_q, d_k):
        raise checks.AttentionInputError(
            f"argument 'weight': expected shape ({heads}, {d_q}, {d_k}) or ({d_q}, {d_k}) "
            f"for query head_dim {d_q} and key head_dim {d_k}, got {weight.shape}"
        )
    return jnp.einsum("...qhd,hde->...qhe", query, weight.astype(query.dtype), precision=precision)


@register(
    "multiplicative",
    capabilities=Capabilities(**dict.fromkeys(EVERY_FEATURE, True), interface="multiplicative"),
)
def multiplicative_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    score: str = "dot",
    weight: jax.Array | None = None,
    scale: float | None = None,
    **arguments: Any,
) -> jax.Array | tuple[jax.Array, ...]:
    """Luong et al. (2015) attention: ``dot`` = ``q . k``, ``general`` = ``q^T W k``.

    Unlike :func:`attn_jax.kernels.dot_product_attention`, the logits are not scaled
    (``scale=1.0``), as in Luong's paper.

    Args:
      query: ``[batch..., q_len, heads, d_q]`` decoder states.
      key: ``[batch..., kv_len, kv_heads, d_k]`` encoder states (``d_q == d_k`` for ``dot``).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      score: ``"dot"`` or ``"general"``.
      weight: ``general`` only: ``[heads, d_q, d_k]`` (or ``[d_q, d_k]`` shared).
      scale: multiplies the logits (default ``None`` = 1.0, unscaled as in Luong et al.).
      bias, mask, **arguments: as in :func:`attn_jax.kernels.dot_product_attention`.

    Returns:
      ``[batch..., q_len, heads, v_head_dim]``; weights / residual when requested.
    """
    if score not in SCORES:
        raise checks.AttentionInputError(
            f"argument 'score': expected one of {SCORES}, got {score!r}"
        )
    if score == "general":
        if weight is None:
            raise checks.AttentionInputError("argument 'weight': required for score='general'")
        checks.check_rank_at_least(query, 3, "query", "[batch..., q_len, heads, d_q]")
        checks.check_rank_at_least(key, 3, "key", "[batch..., kv_len, kv_heads, d_k]")
        precision = arguments.get("precision")
        query = _project_query(jnp.asarray(query), jnp.asarray(weight), key.shape[-1], precision)
    elif weight is not None:
        raise checks.AttentionInputError(
            "argument 'weight': only used by score='general' (got score='dot')"
        )
    call = api.bind(
        query, key, value, bias, mask, scale=1.0 if scale is None else scale, **arguments
    )
    query, key, value = call.safe_inputs()
    logits = softmax_core.dot_logits(query, key, call.scale, call.precision)
    return call.outputs(softmax_core.attend_call(call, logits, value))
