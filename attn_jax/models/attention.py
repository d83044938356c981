"""Multi-head attention layer whose kernel is chosen by registry name."""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import kernels, masks
from attn_jax.models.positions import apply_rope

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with separate query and key/value heads (GQA/MQA).

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads (default ``num_heads``); ``num_heads % num_kv_heads == 0``.
      head_dim: features per head (default ``inputs_q.shape[-1] // num_heads``).
      out_features: output features (default: those of ``inputs_q``).
      attention: registry name of a ``dot_product``-interface kernel.
      attention_kwargs: extra keyword arguments for the kernel (e.g. a window).
      is_causal: causal self-attention (bottom-right aligned).
      rope: rotate queries and keys with RoPE (self-attention).
      dropout_rate: dropout on the attention weights (needs a ``'dropout'`` rng).
      use_bias: biases in the projections.
      dtype: compute dtype (default: the inputs'); param_dtype: parameter dtype.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    attention: str = "dot_product"
    attention_kwargs: Mapping[str, Any] | None = None
    is_causal: bool = False
    rope: bool = False
    dropout_rate: float = 0.0
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _kernel(self):
        spec = kernels.spec(self.attention)
        if spec.capabilities.interface != "dot_product":
            raise ValueError(
                f"MultiHeadAttention: attribute 'attention' must name a dot_product kernel, "
                f"got {self.attention!r} (interface {spec.capabilities.interface!r})"
            )
        return spec

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        kv_lengths: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """Attends from ``inputs_q`` to ``inputs_kv`` (default: self-attention).

        Args:
          inputs_q: ``[batch, q_len, features]``.
          inputs_kv: ``[batch, kv_len, kv_features]``; ``None`` for self-attention.
          mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``; True = attend.
            In decode mode ``kv_len`` is the cache length.
          kv_lengths: ``[batch]`` valid lengths of right-padded keys/values: passed to the
            kernel as ``key_value_seq_lengths`` if it takes them (the linear, Performer and
            sliding-window kernels take no mask), otherwise turned into a mask.
          positions: ``[batch, q_len]`` integer positions for RoPE (default ``0..q_len-1``,
            offset by the cache index when decoding).
          deterministic: disables dropout.
          sow_weights: record the weights ``[batch, heads, q_len, kv_len]`` in
            ``('intermediates', 'attention_weights')``.
          decode: autoregressive decoding with a key/value cache (``'cache'`` collection):
            the first call (``init``, or :func:`attn_jax.decode.init_cache`) sizes the cache
            by its input length; later calls append their keys/values (a whole prompt, then
            one token at a time) and attend to everything cached so far.

        Returns:
          ``[batch, q_len, out_features]``.
        """
        chex.assert_rank(inputs_q, 3, custom_message="inputs_q: expected [batch, q_len, features]")
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        chex.assert_rank(
            inputs_kv, 3, custom_message="inputs_kv: expected [batch, kv_len, features]"
        )
        if decode and not self_attention:
            raise ValueError("MultiHeadAttention: decode=True supports self-attention only")
        spec = self._kernel()
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(
                f"MultiHeadAttention: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({kv_heads})"
            )
        features = inputs_q.shape[-1]
        head_dim = self.head_dim or features // self.num_heads
        dense = lambda heads, name: nn.DenseGeneral(
            (heads, head_dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        query = dense(self.num_heads, "query")(inputs_q)
        key = dense(kv_heads, "key")(inputs_kv)
        value = dense(kv_heads, "value")(inputs_kv)

        q_len = inputs_q.shape[1]
        kwargs: dict[str, Any] = dict(self.attention_kwargs or {})
        if decode and self.has_variable("cache", "cached_key"):
            # Keys are rotated (RoPE) before they are cached, at their own positions.
            query, key, value, mask, positions = self._update_cache(
                query, key, value, mask, positions
            )
        else:
            if positions is None:
                positions = jnp.arange(q_len)
            if self.is_causal:
                kwargs["is_causal"] = True
            if decode:  # initialisation: size the cache by this input
                self._cache_variables(key, value)
            if self.rope:
                key = apply_rope(key, positions)
        if self.rope:
            query = apply_rope(query, positions)
        if kv_lengths is not None:
            if spec.capabilities.seq_lengths:
                kwargs["key_value_seq_lengths"] = kv_lengths
            else:
                padding = masks.lengths_to_mask(kv_lengths, key.shape[1])[:, None, None, :]
                mask = padding if mask is None else jnp.logical_and(mask, padding)
        if mask is not None:
            kwargs["mask"] = mask
        if "rng" in inspect.signature(spec.fn).parameters and "rng" not in kwargs:
            # Random-feature kernels (Performer): one fixed draw of features per layer,
            # derived from the layer's path, so every call computes the same function.
            kwargs["rng"] = jax.random.key(zlib.crc32("/".join(self.path).encode()))
        if self.dropout_rate > 0.0 and not deterministic:
            kwargs.update(dropout_rate=self.dropout_rate, dropout_rng=self.make_rng("dropout"))
        if sow_weights:
            if not spec.capabilities.weights:
                raise ValueError(
                    f"MultiHeadAttention: kernel {self.attention!r} cannot return weights "
                    "(sow_weights=True)"
                )
            out, weights = spec.fn(query, key, value, return_weights=True, **kwargs)
            self.sow("intermediates", "attention_weights", weights)
        else:
            out = spec.fn(query, key, value, **kwargs)
        return nn.DenseGeneral(
            self.out_features or features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)

    def _cache_variables(self, key: jax.Array, value: jax.Array):
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        return cached_key, cached_value, index

    def _update_cache(self, query, key, value, mask, positions):
        """Writes this call's keys/values at the cache index; masks unwritten slots.

        Query ``i`` (absolute position ``index + i``) sees cached keys ``j <= index + i``
        (causal) or ``j < index + q_len`` (non-causal): the bottom-right alignment of a
        query block at the end of the sequence so far.
        """
        cached_key, cached_value, index = self._cache_variables(key, value)
        batch, max_len = cached_key.value.shape[:2]
        q_len = query.shape[1]
        start = index.value
        if positions is None:
            positions = start + jnp.arange(q_len)
        if self.rope:
            key = apply_rope(key, positions)
        zero = jnp.zeros((), jnp.int32)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key, (zero, start, zero, zero)
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value, (zero, start, zero, zero)
        )
        index.value = start + q_len
        key_pos = jnp.arange(max_len)[None, :]
        query_pos = start + jnp.arange(q_len)[:, None]
        visible = key_pos <= query_pos if self.is_causal else key_pos < start + q_len
        visible = jnp.broadcast_to(visible, (batch, 1, q_len, max_len))
        mask = visible if mask is None else jnp.logical_and(visible, mask)
        return query, cached_key.value, cached_value.value, mask, positions
