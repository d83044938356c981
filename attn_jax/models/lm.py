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
from attn_jax.models.layer_stack import run_layers

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
        segment_ids: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        sow_weights: bool = False,
        output_positions: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: ``[batch, length]`` integer tokens, or
          inputs: ``[batch, length, width]`` input embeddings instead of tokens.
          memory: ``[batch, src_len, width]`` encoder outputs (``cross_attention`` only;
            when decoding, only the call that fills the cache needs it, later ones pass
            ``None`` and read the cached keys/values).
          memory_mask: broadcastable to ``[batch, heads, length, src_len]``.
          positions: ``[batch, length]`` positions; default ``0..length-1``, continuing
            each sequence's cache when decoding.
          segment_ids: ``[batch, length]`` segment ids of packed sequences (several
            examples per row, ``positions`` restarting in each): no attention across
            segments.
          lengths: ``[batch]`` when decoding: how many of the ``length`` tokens of each row
            are real (right padding, e.g. prompts of different lengths; default all).
          deterministic: disables dropout (needs a ``'dropout'`` rng otherwise).
          decode: use and extend the KV cache (``mutable=['cache']``); see
            :mod:`attn_jax.decode`.
          sow_weights: record every layer's attention weights in ``'intermediates'``
            (with ``options.scan_layers``: once, with a leading layer axis).
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
        if memory is not None and not self.cross_attention:
            raise ValueError("TransformerLM: argument 'memory' needs cross_attention=True")
        if self.cross_attention and memory is None and not decode:
            raise ValueError(
                "TransformerLM: argument 'memory' is required with cross_attention=True "
                "(only decoding reads it from the cache)"
            )
        source = tokens if tokens is not None else inputs
        chex.assert_rank(source, 2 if tokens is not None else 3)
        batch, length = source.shape[:2]
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)[None, :]
            if decode:  # each sequence continues from its own cached length
                initialized = self.has_variable("cache", "position")
                offset = self.variable("cache", "position", lambda: jnp.zeros((batch,), jnp.int32))
                if initialized:
                    positions = positions + offset.value[:, None]
                    offset.value = offset.value + (length if lengths is None else lengths)
        embedder = TokenEmbedder(self.vocab_size, o, name="embedder")
        if tokens is not None:
            x = embedder(tokens, positions)
        else:
            chex.assert_axis_dimension(inputs, 2, o.width)
            x = embedder.add_positions(inputs.astype(o.dtype), positions)
        x = nn.Dropout(o.dropout_rate)(x, deterministic=deterministic)
        if self.cross_attention:
            layer, attributes = DecoderLayer, None
            inputs = {"memory": memory, "memory_mask": memory_mask}
        else:
            layer, attributes = EncoderLayer, {"is_causal": True}
            inputs = {"segment_ids": segment_ids}
        x = run_layers(
            layer,
            o,
            x,
            layer_kwargs=attributes,
            positions=positions,
            lengths=lengths,
            deterministic=deterministic,
            sow_weights=sow_weights,
            decode=decode,
            **inputs,
        )
        x = nn.LayerNorm(dtype=o.dtype, param_dtype=o.param_dtype, name="final_norm")(x)
        if output_positions is not None:
            chex.assert_rank(output_positions, 2)
            x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
        return embedder.attend(x).astype(jnp.float32)
