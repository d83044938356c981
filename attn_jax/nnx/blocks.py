"""NNX Transformer building blocks: embeddings, MLP, pre-LayerNorm layers and the layer
stack, with the parameters (names and shapes) of their linen twins in
:mod:`attn_jax.models.blocks`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.models.blocks import TransformerOptions, attention_settings
from attn_jax.models.layer_stack import REMAT_POLICIES
from attn_jax.models.positions import check_length, sinusoidal_positions
from attn_jax.nnx.attention import MultiHeadAttention

__all__ = [
    "DecoderLayer",
    "EncoderLayer",
    "EncoderStack",
    "LearnedPositions",
    "Mlp",
    "TokenEmbedder",
    "check_nnx_options",
    "run_layers",
]


def check_nnx_options(options: TransformerOptions) -> None:
    """What the NNX models do not build: the scanned layer stack."""
    if options.scan_layers:
        raise ValueError(
            "options.scan_layers: the attn_jax.nnx models run their layers unrolled "
            "(layer_0, layer_1, ...); set scan_layers=False (attn_jax.nnx.from_linen "
            "converts a scanned linen model's parameters)"
        )


class LearnedPositions(nnx.Module):
    """Learned absolute position embeddings ``embedding [max_len, features]``."""

    def __init__(
        self, max_len: int, features: int, *, param_dtype: Any, init_std: float, rngs: nnx.Rngs
    ):
        init = jax.nn.initializers.normal(init_std)
        self.embedding = nnx.Param(init(rngs.params(), (max_len, features), param_dtype))

    def __call__(self, positions: jax.Array) -> jax.Array:
        """``positions [...]`` in ``[0, max_len)`` -> ``[..., features]`` (clipped)."""
        return jnp.take(self.embedding[...], positions, axis=0, mode="clip")


class TokenEmbedder(nnx.Module):
    """Token embeddings (``embed``, scaled by ``sqrt(width)``) plus absolute positions
    (``learned`` or sinusoidal); the output logits are tied to the embedding."""

    def __init__(self, vocab_size: int, options: TransformerOptions, *, rngs: nnx.Rngs):
        o = self.options = options
        self.embed = nnx.Embed(
            vocab_size,
            o.width,
            embedding_init=jax.nn.initializers.normal(o.width**-0.5),
            dtype=o.dtype,
            param_dtype=o.param_dtype,
            rngs=rngs,
        )
        if o.positions == "learned":
            self.learned = LearnedPositions(
                o.max_len, o.width, param_dtype=o.param_dtype, init_std=1.0, rngs=rngs
            )

    def add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """``x [batch, length, width]`` + encodings of ``positions [batch, length]``."""
        o = self.options
        if o.positions == "learned":
            check_length(x.shape[-2], o.max_len)
            x = x + self.learned(positions).astype(x.dtype)
        elif o.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, o.width).astype(x.dtype)
        return x

    def __call__(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """``tokens [batch, length]`` -> ``[batch, length, width]``."""
        x = self.embed(tokens) * jnp.sqrt(jnp.asarray(self.options.width, self.options.dtype))
        return self.add_positions(x, positions)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output logits: ``[..., width]`` -> ``[..., vocab]``."""
        return self.embed.attend(x)


class Mlp(nnx.Module):
    """``Linear(mlp_dim) -> GELU -> Linear(width)`` (``hidden``, ``output``)."""

    def __init__(self, options: TransformerOptions, *, rngs: nnx.Rngs):
        o = options
        hidden = 4 * o.width if o.mlp_dim is None else o.mlp_dim
        dense = lambda i, j: nnx.Linear(i, j, dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs)
        self.hidden, self.output = dense(o.width, hidden), dense(hidden, o.width)
        self.dropout = nnx.Dropout(o.dropout_rate)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs=None) -> jax.Array:
        y = jax.nn.gelu(self.hidden(x), approximate=True)
        return self.output(self.dropout(y, deterministic=deterministic, rngs=rngs))


def _attention(
    o: TransformerOptions, *, is_causal: bool, rope: bool, rngs: nnx.Rngs, cross: bool = False
) -> MultiHeadAttention:
    settings = attention_settings(o, is_causal=is_causal, rope=rope, cross=cross)
    return MultiHeadAttention(o.num_heads, o.width, rngs=rngs, **settings)


def _norm(o: TransformerOptions, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(o.width, dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs)


class EncoderLayer(nnx.Module):
    """Pre-LayerNorm layer: ``x + SelfAttention(LN(x))``, then ``x + Mlp(LN(x))``."""

    def __init__(self, options: TransformerOptions, *, is_causal: bool = False, rngs: nnx.Rngs):
        o = self.options = options
        self.attention_norm = _norm(o, rngs)
        self.attention = _attention(o, is_causal=is_causal, rope=o.positions == "rope", rngs=rngs)
        if o.mlp_dim != 0:
            self.mlp_norm, self.mlp = _norm(o, rngs), Mlp(o, rngs=rngs)
        self.dropout = nnx.Dropout(o.dropout_rate)

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        rngs=None,
        **attention_inputs: Any,
    ) -> jax.Array:
        """``x [batch, length, width]``; ``attention_inputs``: the attention layer's
        (``mask``, ``kv_lengths``, ``positions``, ``segment_ids``, ``lengths``,
        ``sow_weights``, ``decode``)."""
        drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
        y = self.attention(
            self.attention_norm(x), deterministic=deterministic, rngs=rngs, **attention_inputs
        )
        x = x + drop(y)
        if self.options.mlp_dim == 0:
            return x
        return x + drop(self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=rngs))


class DecoderLayer(nnx.Module):
    """Pre-LayerNorm decoder layer: causal self-attention, cross-attention to a memory, MLP."""

    def __init__(self, options: TransformerOptions, *, rngs: nnx.Rngs):
        o = self.options = options
        self.self_attention_norm = _norm(o, rngs)
        self.self_attention = _attention(o, is_causal=True, rope=o.positions == "rope", rngs=rngs)
        self.cross_attention_norm = _norm(o, rngs)
        self.cross_attention = _attention(o, is_causal=False, rope=False, rngs=rngs, cross=True)
        if o.mlp_dim != 0:
            self.mlp_norm, self.mlp = _norm(o, rngs), Mlp(o, rngs=rngs)
        self.dropout = nnx.Dropout(o.dropout_rate)

    def __call__(
        self,
        x: jax.Array,
        *,
        memory: jax.Array | None,
        memory_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
        decode: bool = False,
        rngs=None,
    ) -> jax.Array:
        """``x [batch, tgt_len, width]``, ``memory [batch, src_len, width]`` (``None`` when
        decoding from the cached memory)."""
        drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)
        common = dict(deterministic=deterministic, sow_weights=sow_weights, decode=decode)
        y = self.self_attention(
            self.self_attention_norm(x), positions=positions, lengths=lengths, rngs=rngs, **common
        )
        x = x + drop(y)
        y = self.cross_attention(
            self.cross_attention_norm(x), memory, mask=memory_mask, rngs=rngs, **common
        )
        x = x + drop(y)
        if self.options.mlp_dim == 0:
            return x
        return x + drop(self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=rngs))


def make_layers(module: nnx.Module, options: TransformerOptions, make) -> None:
    """Sets ``module.layer_0 ... layer_{n-1}`` to ``make()`` (the linen names)."""
    check_nnx_options(options)
    module.num_layers = options.num_layers
    for i in range(options.num_layers):
        setattr(module, f"layer_{i}", make())


def run_layers(module: nnx.Module, x: jax.Array, **inputs: Any) -> jax.Array:
    """``module.layer_0 ...`` over ``x [batch, length, width]``, each rematerialised in the
    backward pass by ``module.options.remat`` (:data:`REMAT_POLICIES`)."""
    policy = module.options.remat
    for i in range(module.num_layers):
        layer = getattr(module, f"layer_{i}")
        if policy == "none":
            x = layer(x, **inputs)
        else:
            call = lambda layer, x: layer(x, **inputs)
            x = nnx.remat(call, policy=REMAT_POLICIES[policy], prevent_cse=True)(layer, x)
    return x


class EncoderStack(nnx.Module):
    """``options.num_layers`` bidirectional :class:`EncoderLayer` s and a final LayerNorm."""

    def __init__(self, options: TransformerOptions, *, rngs: nnx.Rngs):
        self.options = options
        make_layers(self, options, lambda: EncoderLayer(options, rngs=rngs))
        self.dropout = nnx.Dropout(options.dropout_rate)
        self.final_norm = _norm(options, rngs)

    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, rngs=None, **inputs: Any
    ) -> jax.Array:
        """``x [batch, length, width]`` -> ``[batch, length, width]``; ``inputs``: ``mask``,
        ``kv_lengths``, ``positions``, ``sow_weights`` (see the linen stack)."""
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        x = run_layers(self, x, deterministic=deterministic, rngs=rngs, **inputs)
        return self.final_norm(x)
