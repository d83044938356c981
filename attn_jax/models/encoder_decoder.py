"""Encoder-decoder Transformer (translation style)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.blocks import TokenEmbedder, TransformerOptions, check_options
from attn_jax.models.encoder_stack import EncoderStack
from attn_jax.models.lm import TransformerLM

__all__ = ["EncoderDecoder"]


class EncoderDecoder(nn.Module):
    """Transformer encoder over source tokens, causal decoder with cross-attention.

    Attributes:
      src_vocab_size / tgt_vocab_size: vocabularies; ``pad_id`` marks source padding.
      options: shared by encoder and decoder (``options.num_layers`` each).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    options: TransformerOptions = TransformerOptions()
    pad_id: int = 0

    def setup(self):
        check_options(self.options)
        self.src_embedder = TokenEmbedder(self.src_vocab_size, self.options)
        self.encoder = EncoderStack(self.options)
        self.decoder = TransformerLM(self.tgt_vocab_size, self.options, cross_attention=True)

    def encode(
        self, src: jax.Array, *, deterministic: bool = True, sow_weights: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """``src [batch, src_len]`` -> memory ``[batch, src_len, width]`` and its key mask
        ``[batch, 1, 1, src_len]``."""
        chex.assert_rank(src, 2, custom_message="src: expected [batch, src_len]")
        positions = jnp.arange(src.shape[1])[None, :]
        memory_mask = (src != self.pad_id)[:, None, None, :]
        x = self.src_embedder(src, positions)
        memory = self.encoder(
            x,
            mask=memory_mask,
            positions=positions,
            deterministic=deterministic,
            sow_weights=sow_weights,
        )
        return memory, memory_mask

    def decode(
        self,
        tgt: jax.Array,
        memory: jax.Array | None,
        memory_mask: jax.Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
        sow_weights: bool = False,
    ) -> jax.Array:
        """``tgt [batch, tgt_len]`` (shifted right) -> ``[batch, tgt_len, tgt_vocab]`` logits.

        When decoding (``decode=True``), the call that creates the cache projects
        ``memory`` into every cross-attention layer's keys/values once; later calls pass
        ``memory=None`` and read them (see :func:`attn_jax.decode.translate`).
        """
        return self.decoder(
            tgt,
            memory,
            memory_mask=memory_mask,
            deterministic=deterministic,
            decode=decode,
            sow_weights=sow_weights,
        )

    def __call__(
        self,
        src: jax.Array,
        tgt: jax.Array,
        *,
        deterministic: bool = True,
        sow_weights: bool = False,
    ) -> jax.Array:
        """Teacher-forced logits ``[batch, tgt_len, tgt_vocab]`` for ``tgt`` (shifted right)."""
        memory, memory_mask = self.encode(src, deterministic=deterministic, sow_weights=sow_weights)
        return self.decode(
            tgt, memory, memory_mask, deterministic=deterministic, sow_weights=sow_weights
        )
