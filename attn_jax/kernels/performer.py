"""Performer attention (Choromanski et al. 2021): FAVOR+, positive orthogonal random
features whose inner products estimate ``exp(q . k * scale)`` without bias, so the output
approaches exact softmax attention as the number of features grows. O(N) time and memory.

The random projection comes only from the explicit ``rng`` key: same key, same features.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels.feature_maps import check_feature_inputs, feature_attention
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["orthogonal_features", "performer_attention", "positive_features"]


def _orthonormal_rows(matrices: jax.Array) -> jax.Array:
    """Rows of ``[blocks, dim, dim]`` full-rank matrices made orthonormal by Gram-Schmidt,
    each projection done twice ("twice is enough": orthogonal to float rounding).

    Plain matmuls rather than ``jnp.linalg.qr``: on CPU that is a LAPACK custom call, and a
    jitted Transformer calling it wedged XLA's thread pool on a later execution (no CPU use,
    never returns; jax 0.10.2, 2-core host).
    """
    dim = matrices.shape[-1]
    project = lambda basis, row: jnp.einsum(
        "bj,bjd->bd",
        jnp.einsum("bjd,bd->bj", basis, row, precision="highest"),
        basis,
        precision="highest",
    )

    def orthonormalise(i, rows):
        earlier = jnp.where((jnp.arange(dim) < i)[:, None], rows, 0.0)
        row = rows[:, i]
        row = row - project(earlier, row)
        row = row - project(earlier, row)
        return rows.at[:, i].set(row / jnp.linalg.norm(row, axis=-1, keepdims=True))

    return jax.lax.fori_loop(0, dim, orthonormalise, matrices)


def orthogonal_features(rng: jax.Array, num_features: int, dim: int) -> jax.Array:
    """``[num_features, dim]`` Gaussian-like projections, orthogonal within each block of
    ``dim`` rows, rows rescaled to chi-distributed norms (FAVOR+'s ORF)."""
    blocks = -(-num_features // dim)
    block_rng, norm_rng = jax.random.split(rng)
    gaussian = jax.random.normal(block_rng, (blocks, dim, dim), jnp.float32)
    rows = _orthonormal_rows(gaussian).reshape(blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_rng, (num_features, dim)), axis=-1)
    return rows * norms[:, None]


def positive_features(x: jax.Array, projection: jax.Array, *, is_query: bool) -> jax.Array:
    """FAVOR+ features ``exp(w_m . x - |x|^2 / 2) / sqrt(m)`` of ``x [..., dim]`` (already
    scaled by ``scale ** 0.5``), rescaled so nothing overflows and every factor cancels:

    keys get ``exp(-|w_m|^2 / 2)``, which bounds their exponent by
    ``-(|x| - |w_m|)^2 / 2 <= 0`` whatever the data (no dependence on other positions, so
    causal and padded outputs are exact); queries get ``exp(+|w_m|^2 / 2)`` back and are
    divided by their own row maximum, which cancels in the attention ratio.
    """
    x = x.astype(jnp.float32)
    shift = 0.5 * jnp.sum(projection * projection, axis=-1)  # [m]
    logits = jnp.einsum("...d,md->...m", x, projection) - 0.5 * jnp.sum(
        x * x, axis=-1, keepdims=True
    )
    if is_query:
        logits = logits + shift
        logits = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    else:
        logits = logits - shift
    return jnp.exp(logits) / math.sqrt(projection.shape[0])


@register(
    "performer",
    capabilities=Capabilities(causal=True, seq_lengths=True, gqa=True, exact=False),
)
def performer_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    rng: jax.Array | None = None,
    num_features: int = 256,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    chunk_size: int = 64,
    precision: Any = None,
) -> jax.Array:
    """Softmax attention estimated with ``num_features`` positive orthogonal random
    features (FAVOR+).

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]`` (GQA: ``heads % kv_heads == 0``).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      rng: ``jax.random`` key drawing the projection (required; redraw it to resample).
      num_features: random features ``m``; the estimate's variance shrinks as ``1/m``.
      scale: logit scale (default ``1 / sqrt(head_dim)``).
      is_causal: ``j <= i`` (needs ``q_len == kv_len``).
      query_seq_lengths, key_value_seq_lengths: ``[batch...]`` padding lengths.

    Masks, biases, windows and dropout raise ``ValueError`` (no random-feature form).

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
        kernel="performer",
    )
    if rng is None:
        raise ValueError("performer: argument 'rng' (a jax.random key) is required")
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"performer: argument 'num_features' must be >= 1, got {num_features}")
    dim = query.shape[-1]
    root = math.sqrt(1.0 / math.sqrt(dim) if scale is None else scale)
    projection = orthogonal_features(rng, num_features, dim)
    phi_q = positive_features(query * root, projection, is_query=True)
    phi_k = positive_features(key * root, projection, is_query=False)
    out = feature_attention(
        phi_q,
        phi_k,
        value,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        chunk_size=chunk_size,
        precision=precision,
    )
    return out.astype(query.dtype)
