"""Transformer encoder for sequence classification or tagging."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import kernels, masks
from attn_jax.models.blocks import TokenEmbedder, TransformerOptions, check_options
from attn_jax.models.encoder_stack import EncoderStack

__all__ = ["POOLINGS", "TransformerEncoder"]

POOLINGS = ("cls", "attention", "mean", "none")


class TransformerEncoder(nn.Module):
    """Bidirectional Transformer with a classification (pooled) or tagging head.

    Attributes:
      vocab_size: input vocabulary; token ``pad_id`` marks padding.
      num_classes: output classes.
      options: sizes, kernel name (``options.attention``), positions, dtypes.
      pooling: ``"cls"`` (a learned token prepended), ``"attention"`` (learned-query
        attention pooling), ``"mean"`` (over valid tokens), or ``"none"`` (tagging: one
        prediction per token).
      pad_id: padding token. Kernels that take no mask (linear, Performer, sliding window)
        get the valid lengths instead (see :class:`~attn_jax.models.MultiHeadAttention`),
        so padding must then be on the right.
    """

    vocab_size: int
    num_classes: int
    options: TransformerOptions = TransformerOptions()
    pooling: str = "cls"
    pad_id: int = 0

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
    ) -> jax.Array:
        """Class logits.

        Args:
          tokens: ``[batch, length]`` integer tokens.
          lengths: ``[batch]`` valid lengths; default: tokens other than ``pad_id``.

        Returns:
          ``[batch, num_classes]`` float32 logits (``[batch, length, num_classes]`` with
          ``pooling="none"``).
        """
        o = self.options
        check_options(o)
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"TransformerEncoder: 'pooling' must be one of {POOLINGS}, got {self.pooling!r}"
            )
        chex.assert_rank(tokens, 2, custom_message="tokens: expected [batch, length]")
        batch, length = tokens.shape
        valid = tokens != self.pad_id if lengths is None else masks.lengths_to_mask(lengths, length)
        positions = jnp.arange(length)[None, :]
        x = TokenEmbedder(self.vocab_size, o, name="embedder")(tokens, positions)
        if self.pooling == "cls":
            cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, o.width), o.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, o.width)), x], 1)
            valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)
            positions = jnp.arange(length + 1)[None, :]
        x = EncoderStack(o, name="encoder")(
            x,
            mask=valid[:, None, None, :],  # [batch, 1 (heads), 1 (q), length]
            positions=positions,
            deterministic=deterministic,
            sow_weights=sow_weights,
        )
        head = nn.Dense(self.num_classes, dtype=o.dtype, param_dtype=o.param_dtype, name="head")
        if self.pooling == "none":
            return head(x).astype(jnp.float32)
        if self.pooling == "cls":
            pooled = x[:, 0]
        elif self.pooling == "mean":
            weights = valid.astype(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        else:
            query = self.param(
                "pool_query", nn.initializers.normal(0.02), (1, o.width), o.param_dtype
            )
            pooled = kernels.attention_pooling(
                x[:, :, None, :], query=query.astype(x.dtype), mask=valid
            )[:, 0]
        return head(pooled).astype(jnp.float32)
