"""Transformer encoder for classification or tagging (NNX), the twin of
:class:`attn_jax.models.TransformerEncoder`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import kernels, masks
from attn_jax.models.blocks import TransformerOptions, check_options
from attn_jax.models.encoder import POOLINGS
from attn_jax.nnx.blocks import EncoderStack, TokenEmbedder

__all__ = ["TransformerEncoder"]

DEFAULT_OPTIONS = TransformerOptions()


class TransformerEncoder(nnx.Module):
    """Bidirectional Transformer with a pooled classification or a tagging head.

    Args: those of the linen model (``vocab_size``, ``num_classes``, ``options``,
    ``pooling``: ``"cls"``, ``"attention"``, ``"mean"`` or ``"none"``; ``pad_id``), and
    ``rngs`` for the parameters.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        options: TransformerOptions = DEFAULT_OPTIONS,
        *,
        pooling: str = "cls",
        pad_id: int = 0,
        rngs: nnx.Rngs,
    ):
        check_options(options)
        if pooling not in POOLINGS:
            raise ValueError(
                f"TransformerEncoder: 'pooling' must be one of {POOLINGS}, got {pooling!r}"
            )
        o = self.options = options
        self.vocab_size, self.num_classes, self.pooling, self.pad_id = (
            vocab_size, num_classes, pooling, pad_id,
        )  # fmt: skip
        normal = jax.nn.initializers.normal(0.02)
        self.embedder = TokenEmbedder(vocab_size, o, rngs=rngs)
        if pooling == "cls":
            self.cls = nnx.Param(normal(rngs.params(), (1, 1, o.width), o.param_dtype))
        elif pooling == "attention":
            self.pool_query = nnx.Param(normal(rngs.params(), (1, o.width), o.param_dtype))
        self.encoder = EncoderStack(o, rngs=rngs)
        self.head = nnx.Linear(
            o.width, num_classes, dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """``tokens [batch, length]`` -> ``[batch, num_classes]`` float32 logits
        (``[batch, length, num_classes]`` with ``pooling="none"``)."""
        o = self.options
        chex.assert_rank(tokens, 2, custom_message="tokens: expected [batch, length]")
        batch, length = tokens.shape
        valid = tokens != self.pad_id if lengths is None else masks.lengths_to_mask(lengths, length)
        positions = jnp.arange(length)[None, :]
        x = self.embedder(tokens, positions)
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (batch, 1, o.width))
            x = jnp.concatenate([cls, x], 1)
            valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid], axis=1)
            positions = jnp.arange(length + 1)[None, :]
        x = self.encoder(
            x,
            mask=valid[:, None, None, :],
            positions=positions,
            deterministic=deterministic,
            sow_weights=sow_weights,
            rngs=rngs,
        )
        if self.pooling == "none":
            return self.head(x).astype(jnp.float32)
        if self.pooling == "cls":
            pooled = x[:, 0]
        elif self.pooling == "mean":
            weights = valid.astype(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        else:
            query = self.pool_query[...].astype(x.dtype)
            pooled = kernels.attention_pooling(x[:, :, None, :], query=query, mask=valid)[:, 0]
        return self.head(pooled).astype(jnp.float32)
