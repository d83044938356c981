"""Transformer building blocks: shared options, embeddings, MLP, pre-LayerNorm layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import kernels
from attn_jax.models.attention import SINKS, MultiHeadAttention, freeze_kwargs
from attn_jax.models.layer_stack import check_layer_options
from attn_jax.models.positions import (
    POSITION_KINDS,
    LearnedPositions,
    check_length,
    sinusoidal_positions,
)

__all__ = [
    "DecoderLayer",
    "EncoderLayer",
    "Mlp",
    "TokenEmbedder",
    "TransformerOptions",
    "attention_settings",
    "check_options",
]


@dataclasses.dataclass(frozen=True)
class TransformerOptions:
    """Sizes and choices shared by every Transformer model.

    Attributes:
      width: model (embedding) features.
      num_layers: number of layers (per stack).
      num_heads / num_kv_heads: query and key/value heads (GQA when fewer kv heads).
      mlp_dim: hidden features of the MLP (default ``4 * width``); ``0``: no MLP, the
        layers are attention only (Zoology's MQAR models).
      attention: registry name of the attention kernel (``dot_product`` interface; default
        ``"auto"``, the fastest exact kernel for the backend and shape), or a flax-style
        ``attention_fn`` callable.
      attention_kwargs: extra keyword arguments for the kernel (held as an immutable
        mapping, so the options stay hashable); a ``local_window_size`` applies to
        self-attention only.
      positions: ``"learned"``, ``"sinusoidal"``, ``"rope"`` or ``"none"``.
      max_len: longest sequence (learned positions; decode cache default).
      dropout_rate: residual/embedding dropout; attention_dropout_rate: on the weights
        (fused into ``flash`` and ``chunked``).
      logits_soft_cap: ``cap * tanh(logits / cap)`` on every attention logit, or ``None``.
      attention_sinks: ``"none"``, ``"learned"`` (one sink logit per head and layer) or
        ``"plus_one"`` ("softmax + 1").
      kv_budget, kv_recent: H2O-style KV-cache eviction when decoding (see
        :class:`~attn_jax.models.attention.MultiHeadAttention`); ``None``: none.
      dtype: compute dtype; param_dtype: parameter dtype.
      scan_layers: run the layers as one ``nn.scan`` (compiled once, whatever the depth)
        instead of a Python loop. The parameters are then those of one module ``layers``
        with a leading layer axis (``[num_layers, ...]``) instead of ``layer_0``,
        ``layer_1``, ...: convert with :func:`~attn_jax.models.stack_layer_params` /
        :func:`~attn_jax.models.unstack_layer_params`. Sowed attention weights get a
        leading layer axis too; decoding caches a second one, after the batch
        (:data:`~attn_jax.models.layer_stack.LAYER_AXES`).
      remat: rematerialisation of every layer in the backward pass, by the name of its
        checkpoint policy (:data:`~attn_jax.models.layer_stack.REMAT_POLICIES`):
        ``"none"`` (keep every activation), ``"full"`` (keep only each layer's input,
        recompute the rest), ``"dots"`` (keep matmul outputs), ``"dots_with_no_batch_dims"``
        (keep the projections' and MLP's matmul outputs, recompute attention scores);
        with or without ``scan_layers``. Unrolled, XLA may schedule the recomputation
        early and keep it all (it does on CPU: ``experiments/bench_depth.py``); in the
        scan, it runs layer by layer in the backward loop.
    """

    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_dim: int | None = None
    attention: str = "auto"
    attention_kwargs: Mapping[str, Any] | None = None
    positions: str = "learned"
    max_len: int = 512
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    logits_soft_cap: float | None = None
    attention_sinks: str = "none"
    kv_budget: int | None = None
    kv_recent: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "attention_kwargs", freeze_kwargs(self.attention_kwargs))


def check_options(options: TransformerOptions) -> None:
    """Validates options with errors naming the field."""
    if callable(options.attention):
        return _check_sizes(options)
    spec = kernels.spec(options.attention)  # unknown names raise, listing the choices
    if spec.capabilities.interface != "dot_product":
        raise ValueError(
            f"options.attention: {options.attention!r} is a {spec.capabilities.interface!r} "
            "kernel; Transformer layers need a dot_product kernel"
        )
    wanted = {
        "logits_soft_cap": ("soft_cap", options.logits_soft_cap is not None),
        "attention_sinks": ("sinks", options.attention_sinks != "none"),
        "attention_dropout_rate": ("dropout", options.attention_dropout_rate > 0.0),
        "kv_budget": ("mass", options.kv_budget is not None),
    }
    for field, (capability, asked) in wanted.items():
        if asked and not getattr(spec.capabilities, capability):
            raise ValueError(
                f"options.{field}: kernel {options.attention!r} does not support it; "
                f"kernels that do: {_kernels_with(capability)}"
            )
    _check_sizes(options)


def _kernels_with(capability: str) -> list[str]:
    return [
        n
        for n in kernels.available(interface="dot_product")
        if getattr(kernels.capabilities(n), capability)
    ]


def _check_sizes(options: TransformerOptions) -> None:
    check_layer_options(options)
    if options.positions not in POSITION_KINDS:
        raise ValueError(
            f"options.positions: expected one of {POSITION_KINDS}, got {options.positions!r}"
        )
    if options.width % options.num_heads:
        raise ValueError(
            f"options.width ({options.width}) must be divisible by options.num_heads "
            f"({options.num_heads})"
        )
    mlp_dim = options.mlp_dim
    if mlp_dim is not None and (not isinstance(mlp_dim, int) or mlp_dim < 0):
        raise ValueError(
            f"options.mlp_dim: expected None (4 * width), 0 (no MLP) or a positive integer, "
            f"got {mlp_dim!r}"
        )
    kv_heads = options.num_kv_heads or options.num_heads
    if options.num_heads % kv_heads:
        raise ValueError(
            f"options.num_heads ({options.num_heads}) must be a multiple of "
            f"options.num_kv_heads ({kv_heads})"
        )
    if options.attention_sinks not in SINKS:
        raise ValueError(
            f"options.attention_sinks: expected one of {SINKS}, got {options.attention_sinks!r}"
        )
    cap = options.logits_soft_cap
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int | float) or cap <= 0):
        raise ValueError(
            f"options.logits_soft_cap: expected None or a positive number, got {cap!r}"
        )
    budget, recent = options.kv_budget, options.kv_recent
    if isinstance(recent, bool) or not isinstance(recent, int) or recent < 0:
        raise ValueError(f"options.kv_recent: expected an integer >= 0, got {recent!r}")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < max(recent, 1)
    ):
        raise ValueError(
            f"options.kv_budget: expected None or an integer >= max(kv_recent, 1) "
            f"({max(recent, 1)}), got {budget!r}"
        )
    for name in ("dropout_rate", "attention_dropout_rate"):
        if not 0.0 <= getattr(options, name) < 1.0:
            raise ValueError(
                f"options.{name}: expected a value in [0, 1), got {getattr(options, name)}"
            )


class TokenEmbedder(nn.Module):
    """Token embeddings plus absolute positions (learned or sinusoidal; RoPE lives in the
    attention layers)."""

    vocab_size: int
    options: TransformerOptions

    def setup(self):
        o = self.options
        self.embed = nn.Embed(
            self.vocab_size,
            o.width,
            embedding_init=nn.initializers.normal(self.options.width**-0.5),
            dtype=o.dtype,
            param_dtype=o.param_dtype,
        )
        if o.positions == "learned":
            # Unit scale, like the scaled token embeddings: at std 0.02 the positions are
            # drowned out and a 2-layer model stalls on recall tasks (MQAR at ~0.48
            # accuracy after 6,000 steps; ~0.97 after 1,500 steps at unit scale).
            self.learned = LearnedPositions(o.max_len, o.width, o.param_dtype, init_std=1.0)

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
        """``tokens [batch, length]`` -> ``[batch, length, width]``.

        The table is initialised with standard deviation ``width ** -0.5`` and scaled by
        ``sqrt(width)`` here, so inputs have unit scale and the tied output logits start
        near zero.
        """
        x = self.embed(tokens) * jnp.sqrt(jnp.asarray(self.options.width, self.options.dtype))
        return self.add_positions(x, positions)

    def attend(self, x: jax.Array) -> jax.Array:
        """Output logits tied to the embedding matrix: ``[..., width]`` -> ``[..., vocab]``."""
        return self.embed.attend(x)


class Mlp(nn.Module):
    """``Dense(mlp_dim) -> GELU -> Dense(width)``."""

    options: TransformerOptions

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        o = self.options
        dense = lambda features, name: nn.Dense(
            features, dtype=o.dtype, param_dtype=o.param_dtype, name=name
        )
        y = nn.gelu(dense(4 * o.width if o.mlp_dim is None else o.mlp_dim, "hidden")(x))
        y = nn.Dropout(o.dropout_rate)(y, deterministic=deterministic)
        return dense(o.width, "output")(y)


def attention_settings(
    o: TransformerOptions, *, is_causal: bool, rope: bool, cross: bool = False
) -> dict[str, Any]:
    """The attention layer's attributes in a Transformer of options ``o`` (the same for the
    linen layer and its NNX twin)."""
    return dict(
        num_kv_heads=o.num_kv_heads,
        attention=o.attention,
        attention_kwargs=o.attention_kwargs,
        is_causal=is_causal,
        cross_attention=cross,
        rope=rope,
        dropout_rate=o.attention_dropout_rate,
        logits_soft_cap=o.logits_soft_cap,
        sinks=o.attention_sinks,
        kv_budget=None if cross else o.kv_budget,
        kv_recent=o.kv_recent,
        dtype=o.dtype,
        param_dtype=o.param_dtype,
    )


def _attention(
    o: TransformerOptions, *, is_causal: bool, rope: bool, name: str, cross: bool = False
) -> MultiHeadAttention:
    settings = attention_settings(o, is_causal=is_causal, rope=rope, cross=cross)
    return MultiHeadAttention(num_heads=o.num_heads, name=name, **settings)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm layer: ``x + SelfAttention(LN(x))``, then ``x + Mlp(LN(x))``."""

    options: TransformerOptions
    is_causal: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        kv_lengths: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """``x [batch, length, width]``; ``mask`` broadcastable to ``[batch, heads, q, kv]``;
        ``kv_lengths [batch]``: valid lengths of right-padded ``x``; ``segment_ids [batch,
        length]`` of packed sequences; ``lengths [batch]``: real new tokens when decoding
        (see :class:`MultiHeadAttention`)."""
        o = self.options
        norm = lambda name: nn.LayerNorm(dtype=o.dtype, param_dtype=o.param_dtype, name=name)
        drop = nn.Dropout(o.dropout_rate)
        y = _attention(o, is_causal=self.is_causal, rope=o.positions == "rope", name="attention")(
            norm("attention_norm")(x),
            mask=mask,
            kv_lengths=kv_lengths,
            positions=positions,
            segment_ids=segment_ids,
            lengths=lengths,
            deterministic=deterministic,
            sow_weights=sow_weights,
            decode=decode,
        )
        x = x + drop(y, deterministic=deterministic)
        if o.mlp_dim == 0:
            return x
        y = Mlp(o, name="mlp")(norm("mlp_norm")(x), deterministic=deterministic)
        return x + drop(y, deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Pre-LayerNorm decoder layer: causal self-attention, cross-attention to ``memory``, MLP."""

    options: TransformerOptions

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None,
        *,
        memory_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        lengths: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """``x [batch, tgt_len, width]``, ``memory [batch, src_len, width]`` (``None`` when
        decoding from the cached memory), ``memory_mask`` broadcastable to ``[batch, heads,
        tgt_len, src_len]``."""
        o = self.options
        norm = lambda name: nn.LayerNorm(dtype=o.dtype, param_dtype=o.param_dtype, name=name)
        drop = nn.Dropout(o.dropout_rate)
        y = _attention(o, is_causal=True, rope=o.positions == "rope", name="self_attention")(
            norm("self_attention_norm")(x),
            positions=positions,
            lengths=lengths,
            deterministic=deterministic,
            sow_weights=sow_weights,
            decode=decode,
        )
        x = x + drop(y, deterministic=deterministic)
        y = _attention(o, is_causal=False, rope=False, name="cross_attention", cross=True)(
            norm("cross_attention_norm")(x),
            memory,
            mask=memory_mask,
            deterministic=deterministic,
            sow_weights=sow_weights,
            decode=decode,
        )
        x = x + drop(y, deterministic=deterministic)
        if o.mlp_dim == 0:
            return x
        y = Mlp(o, name="mlp")(norm("mlp_norm")(x), deterministic=deterministic)
        return x + drop(y, deterministic=deterministic)
