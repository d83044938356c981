"""Encoder-decoder Transformer over tokens (NNX), the twin of
:class:`attn_jax.models.EncoderDecoder`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.models.blocks import TransformerOptions, check_options
from attn_jax.nnx.blocks import EncoderStack, TokenEmbedder
from attn_jax.nnx.lm import TransformerLM

__all__ = ["EncoderDecoder"]

DEFAULT_OPTIONS = TransformerOptions()


class EncoderDecoder(nnx.Module):
    """Transformer encoder over source tokens, causal decoder with cross-attention.

    Args: those of the linen model (``src_vocab_size``, ``tgt_vocab_size``, ``options``,
    ``pad_id``) and ``rngs``. A ``source`` module (images) is linen-only for now.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        options: TransformerOptions = DEFAULT_OPTIONS,
        *,
        pad_id: int = 0,
        rngs: nnx.Rngs,
    ):
        check_options(options)
        self.options, self.pad_id = options, pad_id
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.src_embedder = TokenEmbedder(src_vocab_size, options, rngs=rngs)
        self.encoder = EncoderStack(options, rngs=rngs)
        self.decoder = TransformerLM(tgt_vocab_size, options, cross_attention=True, rngs=rngs)

    def encode(
        self,
        src: jax.Array,
        *,
        deterministic: bool = True,
        sow_weights: bool = False,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``src [batch, src_len]`` -> memory ``[batch, src_len, width]`` and its key mask
        ``[batch, 1, 1, src_len]``."""
        chex.assert_rank(src, 2, custom_message="src: expected [batch, src_len]")
        positions = jnp.arange(src.shape[1])[None, :]
        memory_mask = (src != self.pad_id)[:, None, None, :]
        memory = self.encoder(
            self.src_embedder(src, positions),
            mask=memory_mask,
            positions=positions,
            deterministic=deterministic,
            sow_weights=sow_weights,
            rngs=rngs,
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
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """``tgt [batch, tgt_len]`` (shifted right) -> ``[batch, tgt_len, tgt_vocab]``
        logits; when decoding, ``memory=None`` reads the cache that :meth:`init_cache`
        filled."""
        return self.decoder(
            tgt,
            memory,
            memory_mask=memory_mask,
            deterministic=deterministic,
            decode=decode,
            sow_weights=sow_weights,
            rngs=rngs,
        )

    def init_cache(self, batch: int, max_len: int, *, memory: jax.Array) -> None:
        """The decoder's cache: ``max_len`` target positions and the cross-attention
        keys/values of ``memory [batch, src_len, width]`` (from :meth:`encode`)."""
        self.decoder.init_cache(batch, max_len, memory=memory)

    def __call__(
        self,
        src: jax.Array,
        tgt: jax.Array,
        *,
        deterministic: bool = True,
        sow_weights: bool = False,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced logits ``[batch, tgt_len, tgt_vocab]`` for ``tgt`` (shifted right)."""
        common = dict(deterministic=deterministic, sow_weights=sow_weights, rngs=rngs)
        memory, memory_mask = self.encode(src, **common)
        return self.decode(tgt, memory, memory_mask, **common)
