"""attn_jax: attention mechanisms in JAX/Flax."""

from attn_jax import kernels, masks

__version__ = "0.1.0"
__all__ = ["kernels", "masks"]
