"""Position information: rotary embeddings (RoPE), sinusoidal and learned positions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LearnedPositions", "apply_rope", "check_length", "sinusoidal_positions"]

POSITION_KINDS = ("none", "rope", "sinusoidal", "learned")


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al., 2021), rotating pairs ``(x[2i], x[2i+1])``.

    Args:
      x: ``[batch..., length, heads, head_dim]`` queries or keys; ``head_dim`` even.
      positions: ``[batch..., length]`` (or ``[length]``) integer positions.
      base: frequency base.

    Returns:
      ``x`` rotated by position-dependent angles, same shape and dtype.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rope: argument 'x' needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..., length, d/2]
    sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]  # heads axis
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def sinusoidal_positions(positions: jax.Array, features: int) -> jax.Array:
    """Sinusoidal encodings (Vaswani et al., 2017) ``[..., features]`` for integer positions."""
    half = features // 2
    inv_freq = 10000.0 ** (-np.arange(half, dtype=np.float32) / max(half, 1))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if features % 2:
        table = jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, 1)])
    return table


def check_length(length: int, max_len: int, what: str = "sequence length") -> None:
    """Raises ``ValueError`` when learned positions cannot cover ``length`` positions."""
    if length > max_len:
        raise ValueError(
            f"options.max_len ({max_len}) is shorter than the {what} ({length}); "
            "raise max_len or use positions='rope'/'sinusoidal'"
        )


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings ``[max_len, features]``, initialised from
    ``normal(init_std)``: match the scale of what they are added to."""

    max_len: int
    features: int
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        """``positions [...]`` integers in ``[0, max_len)`` -> ``[..., features]``.

        Callers check lengths against ``max_len`` (statically: :func:`check_length`);
        positions beyond it are clipped to the last row rather than producing NaN.
        """
        table = self.param(
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.max_len, self.features),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0, mode="clip")
