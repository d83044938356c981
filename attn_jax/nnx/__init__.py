"""Flax NNX twins of the attn_jax models: the same hyperparameters, parameters (linen's
paths and shapes), call arguments, caches and numbers.

- :class:`MultiHeadAttention` (kernel by name or callable, GQA, RoPE, sinks, soft cap,
  a cache with positions-based visibility), :class:`TransformerLM`,
  :class:`TransformerEncoder`, :class:`EncoderDecoder`, :class:`VisionTransformer`.
- :func:`from_linen` / :func:`to_linen` convert models and parameters both ways.
- Decoding: :func:`attn_jax.decode.generate` / :func:`attn_jax.decode.translate` take an
  NNX model in place of ``(model, params)``.
- Training: ``launch.py`` with ``config.model.api="nnx"`` (:class:`Functional`).
"""

from attn_jax.nnx.attention import MultiHeadAttention
from attn_jax.nnx.convert import from_linen, merge_params, nnx_twin, params_of, to_linen
from attn_jax.nnx.encoder import TransformerEncoder
from attn_jax.nnx.encoder_decoder import EncoderDecoder
from attn_jax.nnx.functional import Functional
from attn_jax.nnx.lm import TransformerLM
from attn_jax.nnx.vit import VisionTransformer

__all__ = [
    "EncoderDecoder",
    "Functional",
    "MultiHeadAttention",
    "TransformerEncoder",
    "TransformerLM",
    "VisionTransformer",
    "from_linen",
    "merge_params",
    "nnx_twin",
    "params_of",
    "to_linen",
]
