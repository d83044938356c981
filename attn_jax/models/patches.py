"""Images as sequences of patches: the patch embedding of the ViT, and a source module that
lets the sequence-to-sequence models read images instead of tokens.

Patches are non-overlapping ``patch_size x patch_size`` squares in raster order (row by row,
left to right): patch ``i`` of a ``rows x cols`` grid covers rows ``(i // cols) * p ...`` and
columns ``(i % cols) * p ...`` of the image. :func:`patch_grid` gives the grid, which maps a
weight per patch back onto the pixels (:func:`attn_jax.viz.patches_to_pixels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.positions import sinusoidal_positions

__all__ = ["PATCH_POSITIONS", "PatchEmbedder", "embed_patches", "patch_grid"]

PATCH_POSITIONS = ("learned", "sinusoidal", "none")


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of the patches of a ``height x width`` image; raises ``ValueError``
    unless both sides are multiples of ``patch_size``."""
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"patch_size: image size {height}x{width} is not a multiple of patch_size {patch_size}"
        )
    return height // patch_size, width // patch_size


def embed_patches(
    images: jax.Array,
    features: int,
    patch_size: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str = "patch_embedding",
) -> jax.Array:
    """Linear patch embedding (a ``patch_size``-strided convolution), called inside a
    module's ``nn.compact`` method (the convolution is its submodule ``name``).

    Args:
      images: ``[batch, height, width, channels]``, sides multiples of ``patch_size``.

    Returns:
      ``[batch, rows * cols, features]`` in raster order.
    """
    batch, height, width, _ = images.shape
    patch_grid(height, width, patch_size)
    x = nn.Conv(
        features,
        (patch_size, patch_size),
        strides=(patch_size, patch_size),
        padding="VALID",
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )(images.astype(dtype))
    return x.reshape(batch, -1, features)


class PatchEmbedder(nn.Module):
    """A source module for :class:`~attn_jax.models.EncoderDecoder` and
    :class:`~attn_jax.models.Seq2SeqRNN` (their ``source`` attribute): images to patch
    embeddings, with positions.

    Attributes:
      features: embedding size (the Transformer's ``width``, the RNN's ``embed_dim``).
      patch_size: square patch side.
      conv_channels: optional 3x3 ReLU convolutions (``SAME`` padding, one per entry, its
        output channels) before the patch embedding, so each patch's features see its
        neighbours (the CNN of "show, attend and tell"); default none (a plain ViT).
      positions: ``"learned"`` (one embedding per patch, like the ViT's), ``"sinusoidal"``
        (of the raster index) or ``"none"`` (only when the encoder orders the patches itself:
        RoPE, a recurrent encoder; otherwise it sees an unordered set).
    """

    features: int
    patch_size: int = 4
    conv_channels: Sequence[int] = ()
    positions: str = "learned"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, None]:
        """``images [batch, height, width]`` or ``[batch, height, width, channels]`` ->
        ``(embeddings [batch, rows * cols, features], None)``.

        The second output is the source's ``valid`` mask: ``None``, every patch is visible
        (a padded canvas is part of the picture).
        """
        if self.positions not in PATCH_POSITIONS:
            raise ValueError(
                f"PatchEmbedder: 'positions' must be one of {PATCH_POSITIONS}, "
                f"got {self.positions!r}"
            )
        if images.ndim == 3:
            images = images[..., None]
        chex.assert_rank(
            images, 4, custom_message="images: expected [batch, height, width(, channels)]"
        )
        x = images.astype(self.dtype)
        for i, channels in enumerate(self.conv_channels):
            x = nn.relu(
                nn.Conv(
                    channels,
                    (3, 3),
                    padding="SAME",
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"conv_{i}",
                )(x)
            )
        x = embed_patches(
            x, self.features, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype
        )
        count = x.shape[1]
        if self.positions == "learned":
            table = self.param(
                "positions",
                nn.initializers.normal(0.02),
                (count, self.features),
                self.param_dtype,
            )
            x = x + table.astype(x.dtype)
        elif self.positions == "sinusoidal":
            x = x + sinusoidal_positions(jnp.arange(count), self.features).astype(x.dtype)
        return x, None
