"""Vision Transformer (Dosovitskiy et al., 2021) for image classification."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.blocks import TransformerOptions, check_options
from attn_jax.models.encoder_stack import EncoderStack
from attn_jax.models.patches import embed_patches
from attn_jax.models.positions import LearnedPositions, check_length, sinusoidal_positions

__all__ = ["VisionTransformer"]


class VisionTransformer(nn.Module):
    """Patch embedding, a CLS token, learned positions, an encoder and a linear head.

    Attributes:
      num_classes: output classes.
      patch_size: square patch side; image height and width must be multiples of it.
      options: sizes and kernel (``options.max_len`` must cover patches + 1).
      pooling: ``"cls"`` or ``"mean"`` (over patches).
    """

    num_classes: int
    patch_size: int = 4
    options: TransformerOptions = TransformerOptions()
    pooling: str = "cls"

    @nn.compact
    def __call__(
        self, images: jax.Array, *, deterministic: bool = True, sow_weights: bool = False
    ) -> jax.Array:
        """``images [batch, height, width, channels]`` -> ``[batch, num_classes]`` logits."""
        o = self.options
        check_options(o)
        chex.assert_rank(
            images, 4, custom_message="images: expected [batch, height, width, channels]"
        )
        if self.pooling not in ("cls", "mean"):
            raise ValueError(
                f"VisionTransformer: 'pooling' must be 'cls' or 'mean', got {self.pooling!r}"
            )
        batch, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"VisionTransformer: image size {height}x{width} is not a multiple of "
                f"patch_size {p}"
            )
        x = embed_patches(images, o.width, p, dtype=o.dtype, param_dtype=o.param_dtype)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, o.width), o.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, o.width)), x], 1)
        positions = jnp.arange(x.shape[1])[None, :]
        if o.positions == "learned":
            check_length(x.shape[1], o.max_len, "number of patches + 1")
            x = x + LearnedPositions(o.max_len, o.width, o.param_dtype, name="positions")(
                positions
            ).astype(x.dtype)
        elif o.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, o.width).astype(x.dtype)
        x = EncoderStack(o, name="encoder")(
            x, positions=positions, deterministic=deterministic, sow_weights=sow_weights
        )
        pooled = x[:, 0] if self.pooling == "cls" else x[:, 1:].mean(1)
        head = nn.Dense(self.num_classes, dtype=o.dtype, param_dtype=o.param_dtype, name="head")
        return head(pooled).astype(jnp.float32)
