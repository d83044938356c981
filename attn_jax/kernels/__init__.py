"""Attention kernels: pure functions with the ``jax.nn`` / ``flax`` layout, one front end,
one visibility model, and a registry.

Layout: ``query [batch..., q_len, heads, head_dim]``, ``key/value [batch..., kv_len,
kv_heads, head_dim]``; boolean masks (True = attend) and additive biases broadcast to
``[batch..., heads, q_len, kv_len]``. :func:`dot_product_attention` is the front end
(``implementation=`` picks a kernel); :func:`get` returns any kernel by name.
"""

from attn_jax.kernels.additive import additive_attention
from attn_jax.kernels.api import (
    AttentionCall,
    AttentionOutput,
    dispatch,
    dot_product_attention,
)
from attn_jax.kernels.auto import auto_attention
from attn_jax.kernels.block_features import dropout_keep_mask
from attn_jax.kernels.checks import AttentionInputError, UnsupportedArgumentError
from attn_jax.kernels.chunked import chunked_attention
from attn_jax.kernels.dot_product import dense_attention
from attn_jax.kernels.flash import flash_attention
from attn_jax.kernels.flax_adapter import flax_attention_fn
from attn_jax.kernels.linear import linear_attention
from attn_jax.kernels.multiplicative import multiplicative_attention
from attn_jax.kernels.pallas_flash import pallas_flash_attention
from attn_jax.kernels.performer import performer_attention
from attn_jax.kernels.pooling import attention_pooling
from attn_jax.kernels.registry import (
    Capabilities,
    KernelSpec,
    available,
    capabilities,
    get,
    register,
    spec,
    unregister,
)
from attn_jax.kernels.ring import ring_attention
from attn_jax.kernels.sliding_window import sliding_window_attention
from attn_jax.kernels.visibility import Tokens, Visibility

__all__ = [
    "AttentionCall",
    "AttentionInputError",
    "AttentionOutput",
    "Capabilities",
    "KernelSpec",
    "Tokens",
    "UnsupportedArgumentError",
    "Visibility",
    "additive_attention",
    "attention_pooling",
    "auto_attention",
    "available",
    "capabilities",
    "chunked_attention",
    "dense_attention",
    "dispatch",
    "dot_product_attention",
    "dropout_keep_mask",
    "flash_attention",
    "flax_attention_fn",
    "get",
    "linear_attention",
    "multiplicative_attention",
    "pallas_flash_attention",
    "performer_attention",
    "register",
    "ring_attention",
    "sliding_window_attention",
    "spec",
    "unregister",
]
