"""Linear attention (Katharopoulos et al. 2020): feature map ``elu(x) + 1`` in place of
``exp(q . k)``, O(N) time and memory, non-causal or causal (chunked prefix sums).

Approximate: it is not softmax attention, so it is registered with ``exact=False`` and
tested by its own properties (against a float64 evaluation of the same formula,
causality, padding invariance, linear memory).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels.feature_maps import check_feature_inputs, feature_attention
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["elu_feature_map", "linear_attention"]


def elu_feature_map(x: jax.Array) -> jax.Array:
    """``elu(x) + 1`` (positive), computed in float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


@register(
    "linear",
    capabilities=Capabilities(causal=True, seq_lengths=True, gqa=True, exact=False),
)
def linear_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    chunk_size: int = 64,
    precision: Any = None,
) -> jax.Array:
    """``out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)``, ``phi = elu + 1``.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]`` (GQA: ``heads % kv_heads == 0``).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      is_causal: ``j <= i`` (needs ``q_len == kv_len``).
      query_seq_lengths, key_value_seq_lengths: ``[batch...]`` padding lengths.
      chunk_size: causal chunk length (memory ``O(N * chunk)``, time ``O(N * chunk * d)``).

    Arbitrary masks, biases, windows and dropout cannot be expressed with prefix sums:
    passing one raises ``ValueError`` naming it.

    Returns:
      ``[batch..., q_len, heads, v_head_dim]`` in the query's dtype.
    """
    check_feature_inputs(
        query,
        key,
        value,
        bias,
        mask,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        kernel="linear",
    )
    out = feature_attention(
        elu_feature_map(query),
        elu_feature_map(key),
        value,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        chunk_size=chunk_size,
        precision=precision,
    )
    return out.astype(query.dtype)
