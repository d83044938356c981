"""Linear attention (Katharopoulos et al. 2020): feature map ``elu(x) + 1`` in place of
``exp(q . k)``, O(N) time and memory, non-causal or causal (chunked prefix sums), and a
recurrent form for decoding (a state per sequence, O(1) in its length).

Approximate: it is not softmax attention, so it is registered with ``exact=False`` and
tested by its own properties (against a float64 evaluation of the same formula,
causality, padding invariance, linear memory).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.feature_maps import Recurrence, prefix_attention
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["LINEAR_RECURRENCE", "elu_feature_map", "linear_attention"]


def elu_feature_map(x: jax.Array) -> jax.Array:
    """``elu(x) + 1`` (positive), computed in float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def _features(x: jax.Array, is_query: bool, options: dict[str, Any]) -> jax.Array:
    del is_query, options
    return elu_feature_map(x)


LINEAR_RECURRENCE = Recurrence(_features, lambda head_dim, options: head_dim)


@register(
    "linear",
    capabilities=Capabilities(
        causal=True, seq_lengths=True, gqa=True, exact=False, decode="recurrent"
    ),
    recurrent=LINEAR_RECURRENCE,
)
def linear_attention(call: AttentionCall, *, chunk_size: int = 64) -> AttentionOutput:
    """``out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)``, ``phi = elu + 1``
    (no ``scale``: the feature map has none).

    Causal is bottom-right like every kernel here (any ``q_len`` / ``kv_len``). Arbitrary
    masks, biases, windows, segments, explicit positions and dropout cannot be expressed
    with prefix sums: passing one raises ``ValueError`` naming it.

    Options:
      chunk_size: causal chunk length (memory ``O(N * chunk)``, time ``O(N * chunk * d)``).
    """
    features = lambda x, is_query: _features(x, is_query, {})
    return AttentionOutput(prefix_attention(call, features, chunk_size=chunk_size))
