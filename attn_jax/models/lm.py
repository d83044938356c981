"""Decoder-only Transformer language model (also the decoder of the encoder-decoder)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.blocks import (
    DecoderLayer,
    EncoderLayer,
    TokenEmbedder,
    TransformerOptions,
    check_options,
)

__all__ = ["TransformerLM"]


class TransformerLM(nn.Module):
    """Causal Transformer over tokens, with a KV cache for decoding.

    Attributes:
      vocab_size: output (and input) vocabulary.
      options: sizes, kernel name (``options.attention``), positions, dtypes.
      cross_attention: add cross-attention to a ``memory`` in every layer (the decoder of
        :class:`attn_jax.models.EncoderDecoder`).
    """

    vocab_size: int
    options: TransformerOptions = TransformerOptions()
    cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array | None = None,
        memory: jax.Array | None = None,
        *,
        inputs: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        sow_weights: bool = False,
        output_positions: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: ``[batch, length]`` integer tokens, or
          inputs: ``[batch, length, width]`` input embeddings instead of tokens.
          memory: ``[batch, src_len, width]`` encoder outputs (``cross_attention`` only).
          memory_mask: broadcastable to ``[batch, heads, length, src_len]``.
          positions: ``[batch, length]`` positions; default ``0..length-1``, continuing from
            the cache when decoding.
          deterministic: disables dropout (needs a ``'dropout'`` rng otherwise).
          decode: use and extend the KV cache (``mutable=['cache']``); see
            :mod:`attn_jax.decode`.
          sow_weights: record every layer's attention weights in ``'intermediates'``.
          output_positions: ``[batch, n]`` indices: return logits at these positions only
            (e.g. the answer positions of a recall task), saving the vocabulary projection
            elsewhere.

        Returns:
          ``[batch, length, vocab_size]`` float32 logits (``[batch, n, vocab_size]`` with
          ``output_positions``).
        """
        o = self.options
        check_options(o)
        if (tokens is None) == (inputs is None):
            raise ValueError("TransformerLM: pass exactly one of 'tokens' or 'inputs'")
        if self.cross_attention != (memory is not None):
            raise ValueError(
                "TransformerLM: argument 'memory' is required with cross_attention=True "
                "and not allowed without it"
            )
        source = tokens if tokens is not None else inputs
        chex.assert_rank(source, 2 if tokens is not None else 3)
        length = source.shape[1]
        if positions is None:
            positions = jnp.arange(length)[None, :]
            if decode:
                initialized = self.has_variable("cache", "position")
                offset = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
                if initialized:
                    positions = positions + offset.value
                    offset.value = offset.value + length
        embedder = TokenEmbedder(self.vocab_size, o, name="embedder")
        if tokens is not None:
            x = embedder(tokens, positions)
        else:
            chex.assert_axis_dimension(inputs, 2, o.width)
            x = embedder.add_positions(inputs.astype(o.dtype), positions)
        x = nn.Dropout(o.dropout_rate)(x, deterministic=deterministic)
        for i in range(o.num_layers):
            if self.cross_attention:
                x = DecoderLayer(o, name=f"layer_{i}")(
                    x,
                    memory,
                    memory_mask=memory_mask,
                    positions=positions,
                    deterministic=deterministic,
                    sow_weights=sow_weights,
                    decode=decode,
                )
            else:
                x = EncoderLayer(o, is_causal=True, name=f"layer_{i}")(
                    x,
                    positions=positions,
                    deterministic=deterministic,
                    sow_weights=sow_weights,
                    decode=decode,
                )
        x = nn.LayerNorm(dtype=o.dtype, param_dtype=o.param_dtype, name="final_norm")(x)
        if output_positions is not None:
            chex.assert_rank(output_positions, 2)
            x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
        return embedder.attend(x).astype(jnp.float32)
