"""Additive (Bahdanau) attention: ``score(q_i, k_j) = v . tanh(q_i + k_j)``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import api, checks, softmax_core
from attn_jax.kernels.registry import EVERY_FEATURE, Capabilities, register

__all__ = ["additive_attention", "additive_logits"]


def additive_logits(query: jax.Array, key: jax.Array, v: jax.Array) -> jax.Array:
    """Bahdanau scores in float32.

    Args:
      query: ``[batch..., q_len, heads, units]`` projected decoder states (``W_q s``).
      key: ``[batch..., kv_len, kv_heads, units]`` projected encoder states (``W_k h``).
      v: ``[heads, units]`` score vector per head (or ``[units]`` shared).

    Returns:
      ``[batch..., heads, q_len, kv_len]`` float32 logits.
    """
    kv_heads = key.shape[-2]
    heads, units = query.shape[-2], query.shape[-1]
    grouped = softmax_core.group_query_heads(query, kv_heads).astype(jnp.float32)
    # [batch..., q_len, 1, kv_heads, groups, units] + [batch..., 1, kv_len, kv_heads, 1, units]
    hidden = jnp.tanh(
        grouped[..., :, None, :, :, :] + key.astype(jnp.float32)[..., None, :, :, None, :]
    )
    v_grouped = jnp.broadcast_to(v, (heads, units)).reshape(kv_heads, -1, units)
    logits = jnp.einsum("...qkhgu,hgu->...hgqk", hidden, v_grouped.astype(jnp.float32))
    return logits.reshape(*logits.shape[:-4], heads, *logits.shape[-2:])


@register(
    "additive",
    capabilities=Capabilities(**dict.fromkeys(EVERY_FEATURE, True), interface="additive"),
)
def additive_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    v: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    **arguments: Any,
) -> jax.Array | tuple[jax.Array, ...]:
    """Additive attention (Bahdanau et al., 2015): ``softmax_j(v . tanh(q_i + k_j)) v_j``.

    The kernel takes *already projected* features: a model computes ``query = W_q s`` and
    ``key = W_k h`` with its own dense layers (``attn_jax.models``) and owns ``v``. Keeping
    the projections outside makes the kernel a pure function and lets the projected keys be
    computed once per source sequence when decoding step by step.

    Args:
      query: ``[batch..., q_len, heads, units]`` projected queries (decoder states).
      key: ``[batch..., kv_len, kv_heads, units]`` projected keys (encoder states).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]`` values (usually the encoder states).
      v: ``[heads, units]`` (or ``[units]``, shared by every head) score vector.
      bias, mask, **arguments: as in :func:`attn_jax.kernels.dot_product_attention`
        (``is_causal``, ``local_window_size``, lengths, segment ids, positions, dropout,
        ``dtype``, ``precision``, ``return_weights``, ``return_residual``; no ``scale``).

    Returns:
      ``[batch..., q_len, heads, v_head_dim]``; weights ``[batch..., heads, q_len, kv_len]``
      and/or residual when requested.
    """
    if "scale" in arguments:
        checks.fail("scale", "additive scores are not scaled")
    call = api.bind(query, key, value, bias, mask, **arguments)
    query, key, value = call.safe_inputs()
    v = jnp.asarray(v)
    heads, units = query.shape[-2], query.shape[-1]
    if v.shape not in ((units,), (heads, units)):
        raise checks.AttentionInputError(
            f"argument 'v': expected shape ({heads}, {units}) or ({units},), got {v.shape}"
        )
    checks.check_floating(v, "v")
    logits = additive_logits(query, key, v)
    return call.outputs(softmax_core.attend_call(call, logits, value))
