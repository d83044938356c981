"""Encoder-decoder Transformer (translation style), over tokens or any embedded source
(e.g. image patches: a ViT encoder with a captioning decoder)."""

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
    """Transformer encoder over the source, causal decoder with cross-attention.

    Attributes:
      src_vocab_size / tgt_vocab_size: vocabularies; ``pad_id`` marks source padding.
        ``src_vocab_size`` must be 0 with a ``source`` module.
      options: shared by encoder and decoder (``options.num_layers`` each).
      source: a module embedding the source instead of tokens: ``source(src) ->
        (embeddings [batch, src_len, width], valid [batch, src_len] bool or None)``, with
        any absolute positions added (e.g. :class:`~attn_jax.models.PatchEmbedder`:
        ``src [batch, height, width]`` pixels, a ViT encoder over the patches). RoPE, if
        ``options.positions="rope"``, uses ``0 .. src_len - 1``; ``valid=None``: every
        source position is visible.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    options: TransformerOptions = TransformerOptions()
    pad_id: int = 0
    source: nn.Module | None = None

    def setup(self):
        check_options(self.options)
        if self.source is None:
            self.src_embedder = TokenEmbedder(self.src_vocab_size, self.options)
        elif self.src_vocab_size:
            raise ValueError(
                "EncoderDecoder: 'src_vocab_size' must be 0 with a 'source' module (which "
                f"embeds the source itself), got {self.src_vocab_size}"
            )
        self.encoder = EncoderStack(self.options)
        self.decoder = TransformerLM(self.tgt_vocab_size, self.options, cross_attention=True)

    def encode(
        self, src: jax.Array, *, deterministic: bool = True, sow_weights: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """``src [batch, src_len]`` tokens (or what ``source`` takes) -> memory ``[batch,
        src_len, width]`` and its key mask ``[batch, 1, 1, src_len]`` (``None`` when the
        ``source`` module marks every position valid)."""
        if self.source is None:
            chex.assert_rank(src, 2, custom_message="src: expected [batch, src_len]")
            positions = jnp.arange(src.shape[1])[None, :]
            memory_mask = (src != self.pad_id)[:, None, None, :]
            x = self.src_embedder(src, positions)
        else:
            x, valid = self.source(src)
            chex.assert_rank(x, 3, custom_message="source: expected [batch, src_len, width]")
            chex.assert_axis_dimension(
                x, 2, self.options.width, custom_message="source: expected [batch, src_len, width]"
            )
            positions = jnp.arange(x.shape[1])[None, :]
            memory_mask = None if valid is None else valid[:, None, None, :]
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
        memory_mask: jax.Array | None,
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
