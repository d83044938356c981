"""Vision Transformer (NNX), the twin of :class:`attn_jax.models.VisionTransformer`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.models.blocks import TransformerOptions, check_options
from attn_jax.models.patches import patch_grid
from attn_jax.models.positions import check_length, sinusoidal_positions
from attn_jax.nnx.blocks import EncoderStack, LearnedPositions

__all__ = ["VisionTransformer"]

DEFAULT_OPTIONS = TransformerOptions()


class VisionTransformer(nnx.Module):
    """Patch embedding, a CLS token, positions, an encoder and a linear head.

    Args: those of the linen model (``num_classes``, ``patch_size``, ``options``,
    ``pooling``: ``"cls"`` or ``"mean"``), ``in_channels`` (image channels: linen infers
    them) and ``rngs``.
    """

    def __init__(
        self,
        num_classes: int,
        patch_size: int = 4,
        options: TransformerOptions = DEFAULT_OPTIONS,
        *,
        pooling: str = "cls",
        in_channels: int = 1,
        rngs: nnx.Rngs,
    ):
        check_options(options)
        if pooling not in ("cls", "mean"):
            raise ValueError(
                f"VisionTransformer: 'pooling' must be 'cls' or 'mean', got {pooling!r}"
            )
        o = self.options = options
        self.num_classes, self.patch_size, self.pooling = num_classes, patch_size, pooling
        p = patch_size
        self.patch_embedding = nnx.Conv(
            in_channels, o.width, (p, p), strides=(p, p), padding="VALID",
            dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs,
        )  # fmt: skip
        self.cls = nnx.Param(jnp.zeros((1, 1, o.width), o.param_dtype))
        if o.positions == "learned":
            self.positions = LearnedPositions(
                o.max_len, o.width, param_dtype=o.param_dtype, init_std=0.02, rngs=rngs
            )
        self.encoder = EncoderStack(o, rngs=rngs)
        self.head = nnx.Linear(
            o.width, num_classes, dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs
        )

    def __call__(
        self,
        images: jax.Array,
        *,
        deterministic: bool = True,
        sow_weights: bool = False,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """``images [batch, height, width, channels]`` -> ``[batch, num_classes]`` logits."""
        o = self.options
        chex.assert_rank(
            images, 4, custom_message="images: expected [batch, height, width, channels]"
        )
        batch, height, width, _ = images.shape
        patch_grid(height, width, self.patch_size)
        x = self.patch_embedding(images.astype(o.dtype)).reshape(batch, -1, o.width)
        cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (batch, 1, o.width))
        x = jnp.concatenate([cls, x], 1)
        positions = jnp.arange(x.shape[1])[None, :]
        if o.positions == "learned":
            check_length(x.shape[1], o.max_len, "number of patches + 1")
            x = x + self.positions(positions).astype(x.dtype)
        elif o.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, o.width).astype(x.dtype)
        x = self.encoder(
            x, positions=positions, deterministic=deterministic, sow_weights=sow_weights, rngs=rngs
        )
        pooled = x[:, 0] if self.pooling == "cls" else x[:, 1:].mean(1)
        return self.head(pooled).astype(jnp.float32)
