"""Dense scaled dot-product attention: the exact reference kernel of attn_jax (plain XLA).

It consumes the visibility model as one dense boolean mask; everything else (validation,
defaults, the ``jax.nn`` signature) is the front end's, :mod:`attn_jax.kernels.api`.
"""

from __future__ import annotations

from attn_jax.kernels import softmax_core
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.registry import EVERY_FEATURE, register

__all__ = ["dense_attention"]


@register(
    "dot_product",
    capabilities=EVERY_FEATURE,
)
def dense_attention(call: AttentionCall) -> AttentionOutput:
    """Exact attention with the whole ``[batch..., heads, q_len, kv_len]`` logits in
    memory: every feature (dropout, returned weights, residual) and the fastest kernel at
    short lengths."""
    query, key, value = call.safe_inputs()
    logits = softmax_core.dot_logits(query, key, call.scale, call.precision)
    return softmax_core.attend_call(call, logits, value)
