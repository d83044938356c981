"""Dense scaled dot-product attention: the exact reference kernel of attn_jax (plain XLA).

It consumes the visibility model as one dense boolean mask; everything else (validation,
defaults, the ``jax.nn`` signature) is the front end's, :mod:`attn_jax.kernels.api`.
"""

from __future__ import annotations

from attn_jax.kernels import softmax_core
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.registry import Capabilities, register

__all__ = ["dense_attention"]


@register(
    "dot_product",
    capabilities=Capabilities(
        mask=True,
        bias=True,
        causal=True,
        window=True,
        seq_lengths=True,
        segments=True,
        positions=True,
        dropout=True,
        gqa=True,
        weights=True,
        residual=True,
    ),
)
def dense_attention(call: AttentionCall) -> AttentionOutput:
    """Exact attention with the whole ``[batch..., heads, q_len, kv_len]`` logits in
    memory: every feature (dropout, returned weights, residual) and the fastest kernel at
    short lengths."""
    query, key, value = call.safe_inputs()
    logits = softmax_core.dot_logits(query, key, call.scale, call.precision)
    outputs = softmax_core.attend(
        logits,
        value,
        bias=call.bias,
        mask=call.visibility.dense_mask(),
        dropout_rate=call.dropout_rate,
        dropout_rng=call.dropout_rng,
        broadcast_dropout=call.broadcast_dropout,
        out_dtype=call.out_dtype,
        precision=call.precision,
        return_weights=call.return_weights,
        return_residual=call.return_residual,
    )
    out, *extras = outputs if isinstance(outputs, tuple) else (outputs,)
    weights = extras.pop(0) if call.return_weights else None
    residual = extras.pop(0) if call.return_residual else None
    return AttentionOutput(out, residual, weights)
