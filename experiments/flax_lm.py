"""The peer of :class:`attn_jax.models.TransformerLM` in the model benchmark: the same
architecture built on ``flax.linen.MultiHeadDotProductAttention`` (and its ``decode=True``
cache, one token per call).

Pre-LayerNorm layers, learned positions at unit scale, a GELU MLP, tied output embedding,
no projection biases in attention: the parameter tree is the one ``TransformerLM`` with
``positions="learned"`` has, name for name and shape for shape, so the same parameters run
in both (the benchmark's test checks that they give the same logits).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["FlaxLM"]


class _Embedder(nn.Module):
    vocab_size: int
    width: int
    max_len: int

    def setup(self):
        self.embed = nn.Embed(
            self.vocab_size, self.width, embedding_init=nn.initializers.normal(self.width**-0.5)
        )
        self.learned = _Positions(self.max_len, self.width)

    def __call__(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        return self.embed(tokens) * jnp.sqrt(jnp.float32(self.width)) + self.learned(positions)

    def attend(self, x: jax.Array) -> jax.Array:
        return self.embed.attend(x)


class _Positions(nn.Module):
    max_len: int
    features: int

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(1.0), (self.max_len, self.features))
        return jnp.take(table, positions, axis=0, mode="clip")


class _Mlp(nn.Module):
    width: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.gelu(nn.Dense(self.mlp_dim, name="hidden")(x))
        return nn.Dense(self.width, name="output")(y)


class _Layer(nn.Module):
    width: int
    num_heads: int
    mlp_dim: int
    decode: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.width,
            use_bias=False,
            decode=self.decode,
            deterministic=True,
            name="attention",
        )
        x = x + attention(nn.LayerNorm(name="attention_norm")(x), mask=mask)
        return x + _Mlp(self.width, self.mlp_dim, name="mlp")(nn.LayerNorm(name="mlp_norm")(x))


class FlaxLM(nn.Module):
    """Causal LM on flax's attention: ``tokens [batch, length]`` -> float32 logits
    ``[batch, length, vocab_size]``.

    With ``decode=True`` (``mutable=["cache"]``) flax's own cache is used: initialise
    with ``[batch, max_cache]`` tokens, then call with one token ``[batch, 1]`` at a time.
    """

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_len: int
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[1]
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]
        mask = nn.make_causal_mask(tokens)
        if self.decode:
            initialized = self.has_variable("cache", "position")
            offset = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if initialized:  # one token per call, the cache masks the future itself
                positions, mask = positions + offset.value, None
                offset.value = offset.value + length
        embedder = _Embedder(self.vocab_size, self.width, self.max_len, name="embedder")
        x = embedder(tokens, positions)
        for i in range(self.num_layers):
            x = _Layer(self.width, self.num_heads, self.mlp_dim, self.decode, name=f"layer_{i}")(
                x, mask
            )
        return embedder.attend(nn.LayerNorm(name="final_norm")(x)).astype(jnp.float32)
