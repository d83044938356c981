"""Attention through feature maps: ``out_i = phi(q_i) S / phi(q_i) z`` with
``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)`` (prefix sums when causal).

Shared by the ``linear`` (elu + 1) and ``performer`` (FAVOR+) kernels: time and memory are
linear in sequence length. Causal attention runs over chunks: exact (masked) products
within a chunk and a running state between chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from attn_jax.kernels import checks

__all__ = ["check_feature_inputs", "feature_attention"]


def check_feature_inputs(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    is_causal: bool,
    query_seq_lengths: jax.Array | None,
    key_value_seq_lengths: jax.Array | None,
    kernel: str,
) -> None:
    """Layout checks; refuses ``bias``/``mask`` (no prefix-sum form); causal feature
    attention needs ``q_len == kv_len``."""
    for name, given in (("bias", bias), ("mask", mask)):
        if given is not None:
            raise ValueError(
                f"{kernel}: argument '{name}' is not supported: an arbitrary {name} has no "
                "feature-map (prefix-sum) form; use the padding lengths or an exact kernel"
            )
    checks.check_qkv(query, key, value)
    batch_shape = query.shape[:-3]
    checks.check_lengths(query_seq_lengths, batch_shape, "query_seq_lengths")
    checks.check_lengths(key_value_seq_lengths, batch_shape, "key_value_seq_lengths")
    if is_causal and query.shape[-3] != key.shape[-3]:
        raise ValueError(
            f"{kernel}: argument 'is_causal' needs q_len == kv_len (prefix sums over one "
            f"sequence), got q_len {query.shape[-3]} and kv_len {key.shape[-3]}"
        )


def feature_attention(
    phi_q: jax.Array,
    phi_k: jax.Array,
    value: jax.Array,
    *,
    is_causal: bool,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    chunk_size: int = 64,
    precision: Sequence | None = None,
) -> jax.Array:
    """Linear attention given non-negative features.

    Args:
      phi_q: ``[batch..., q_len, heads, features]`` query features (>= 0).
      phi_k: ``[batch..., kv_len, kv_heads, features]`` key features (>= 0).
      value: ``[batch..., kv_len, kv_heads, v_dim]``.
      is_causal: query ``i`` uses keys ``j <= i`` (``q_len == kv_len``).
      query_seq_lengths / key_value_seq_lengths: ``[batch...]``: padded keys contribute
        nothing; padded query rows return zeros.
      chunk_size: causal chunk length.

    Returns:
      ``[batch..., q_len, heads, v_dim]`` float32; rows that see no key are zeros.
    """
    batch_shape = phi_q.shape[:-3]
    q_len, heads, features = phi_q.shape[-3:]
    kv_len, kv_heads = phi_k.shape[-3], phi_k.shape[-2]
    groups = heads // kv_heads
    phi_q = phi_q.reshape(*batch_shape, q_len, kv_heads, groups, features)
    value = value.astype(jnp.float32)
    if key_value_seq_lengths is not None:
        keep = jnp.arange(kv_len) < jnp.asarray(key_value_seq_lengths)[..., None]
        phi_k = phi_k * keep[..., None, None]
    if not is_causal:
        state = jnp.einsum("...khf,...khd->...hfd", phi_k, value, precision=precision)
        norm = phi_k.sum(-3)  # [..., kv_heads, features]
        num = jnp.einsum("...qhgf,...hfd->...qhgd", phi_q, state, precision=precision)
        den = jnp.einsum("...qhgf,...hf->...qhg", phi_q, norm, precision=precision)
    else:
        num, den = _causal(phi_q, phi_k, value, chunk_size, precision)
    # num / den with features as small as 1e-25 (FAVOR+ keys at head_dim 64): autodiff of a
    # plain division squares den, which underflows to 0 and turns gradients into NaN.
    # Dividing both by a constant copy of den leaves the value and the true gradient
    # (-out / den for den) but never squares a small number.
    safe = jnp.where(den > 0, den, 1.0)[..., None]
    constant = jax.lax.stop_gradient(safe)
    out = (num / constant) / (safe / constant)
    out = out.reshape(*batch_shape, q_len, heads, -1)
    if query_seq_lengths is not None:
        rows = jnp.arange(q_len) < jnp.asarray(query_seq_lengths)[..., None]
        out = out * rows[..., None, None]
    return out


def _causal(phi_q, phi_k, value, chunk_size, precision):
    """Chunked prefix sums: ``(numerator [..., q, h, g, d], denominator [..., q, h, g])``."""
    *batch_shape, length, kv_heads, _, features = phi_q.shape
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length

    def split(x):  # [..., length, ...] -> [chunks, ..., chunk, ...]
        axis = len(batch_shape)
        x = jnp.pad(x, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (x.ndim - axis - 1))
        x = x.reshape(*x.shape[:axis], chunks, chunk, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    q_c, k_c, v_c = split(phi_q), split(phi_k), split(value)
    tril = jnp.tril(jnp.ones((chunk, chunk), bool))
    d_v = value.shape[-1]
    state0 = jnp.zeros((*batch_shape, kv_heads, features, d_v), jnp.float32)
    norm0 = jnp.zeros((*batch_shape, kv_heads, features), jnp.float32)

    def step(carry, xs):
        state, norm = carry
        q, k, v = xs
        scores = jnp.einsum("...qhgf,...khf->...hgqk", q, k, precision=precision)
        scores = jnp.where(tril, scores, 0.0)
        num = jnp.einsum("...hgqk,...khd->...qhgd", scores, v, precision=precision)
        num = num + jnp.einsum("...qhgf,...hfd->...qhgd", q, state, precision=precision)
        den = scores.sum(-1)  # [..., h, g, q]
        den = jnp.moveaxis(den, -1, -3) + jnp.einsum("...qhgf,...hf->...qhg", q, norm)
        state = state + jnp.einsum("...khf,...khd->...hfd", k, v, precision=precision)
        norm = norm + k.sum(-3)
        return (state, norm), (num, den)

    _, (num, den) = jax.lax.scan(step, (state0, norm0), (q_c, k_c, v_c))

    def merge(x):  # [chunks, ..., chunk, ...] -> [..., length, ...]
        axis = len(batch_shape)
        x = jnp.moveaxis(x, 0, axis)
        x = x.reshape(*x.shape[:axis], chunks * chunk, *x.shape[axis + 2 :])
        return jax.lax.slice_in_dim(x, 0, length, axis=axis)

    return merge(num), merge(den)
