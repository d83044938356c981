"""Decoder-only Transformer language model (NNX), the twin of
:class:`attn_jax.models.TransformerLM`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.models.blocks import TransformerOptions, check_options
from attn_jax.nnx.blocks import (
    DecoderLayer,
    EncoderLayer,
    TokenEmbedder,
    _norm,
    make_layers,
    run_layers,
)

__all__ = ["TransformerLM"]

DEFAULT_OPTIONS = TransformerOptions()


class TransformerLM(nnx.Module):
    """Causal Transformer over tokens, with a KV cache for decoding.

    Args:
      vocab_size: output (and input) vocabulary.
      options: sizes, kernel name (``options.attention``), positions, dtypes
        (``scan_layers`` must be False; ``remat`` applies per layer).
      cross_attention: cross-attention to a ``memory`` in every layer (the decoder of
        :class:`attn_jax.nnx.EncoderDecoder`).
      rngs: parameter initialisation.

    Parameters are named as the linen model's (``embedder``, ``layer_0`` ...,
    ``final_norm``); :func:`attn_jax.nnx.from_linen` / :func:`attn_jax.nnx.to_linen`
    convert. Decoding: :meth:`init_cache`, then calls with ``decode=True``, or
    :func:`attn_jax.decode.generate`.
    """

    def __init__(
        self,
        vocab_size: int,
        options: TransformerOptions = DEFAULT_OPTIONS,
        *,
        cross_attention: bool = False,
        rngs: nnx.Rngs,
    ):
        check_options(options)
        self.vocab_size, self.options, self.cross_attention = vocab_size, options, cross_attention
        self.embedder = TokenEmbedder(vocab_size, options, rngs=rngs)
        self.dropout = nnx.Dropout(options.dropout_rate)
        if cross_attention:
            make = lambda: DecoderLayer(options, rngs=rngs)
        else:
            make = lambda: EncoderLayer(options, is_causal=True, rngs=rngs)
        make_layers(self, options, make)
        self.final_norm = _norm(options, rngs)

    def init_cache(self, batch: int, max_len: int, *, memory: jax.Array | None = None) -> None:
        """An empty cache of ``max_len`` positions per layer for ``batch`` sequences (and,
        with ``cross_attention``, the keys/values of ``memory [batch, src_len, width]``)."""
        self.position = nnx.Cache(jnp.zeros((batch,), jnp.int32))
        for i in range(self.num_layers):
            layer = getattr(self, f"layer_{i}")
            if self.cross_attention:
                layer.self_attention.init_cache(batch, max_len)
                layer.cross_attention.init_cache(batch, max_len, memory=memory)
            else:
                layer.attention.init_cache(batch, max_len)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        memory: jax.Array | None = None,
        *,
        inputs: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        sow_weights: bool = False,
        output_positions: jax.Array | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits ``[batch, length, vocab_size]`` (float32), with the linen
        model's arguments (see :meth:`attn_jax.models.TransformerLM.__call__`) and ``rngs``
        for dropout."""
        o = self.options
        if (tokens is None) == (inputs is None):
            raise ValueError("TransformerLM: pass exactly one of 'tokens' or 'inputs'")
        if memory is not None and not self.cross_attention:
            raise ValueError("TransformerLM: argument 'memory' needs cross_attention=True")
        if self.cross_attention and memory is None and not decode:
            raise ValueError(
                "TransformerLM: argument 'memory' is required with cross_attention=True "
                "(only decoding reads it from the cache)"
            )
        source = tokens if tokens is not None else inputs
        chex.assert_rank(source, 2 if tokens is not None else 3)
        length = source.shape[1]
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)[None, :]
            if decode:  # each sequence continues from its own cached length
                if not hasattr(self, "position"):
                    raise ValueError(
                        "TransformerLM: decode=True needs a cache: call init_cache(batch, "
                        "max_len) first"
                    )
                offset = self.position.get_value()
                positions = positions + offset[:, None]
                self.position.set_value(offset + (length if lengths is None else lengths))
        if tokens is not None:
            x = self.embedder(tokens, positions)
        else:
            chex.assert_axis_dimension(inputs, 2, o.width)
            x = self.embedder.add_positions(inputs.astype(o.dtype), positions)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        extra = (
            {"memory": memory, "memory_mask": memory_mask}
            if self.cross_attention
            else {"segment_ids": segment_ids}
        )
        x = run_layers(
            self,
            x,
            positions=positions,
            lengths=lengths,
            deterministic=deterministic,
            sow_weights=sow_weights,
            decode=decode,
            rngs=rngs,
            **extra,
        )
        x = self.final_norm(x)
        if output_positions is not None:
            chex.assert_rank(output_positions, 2)
            x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
        return self.embedder.attend(x).astype(jnp.float32)
