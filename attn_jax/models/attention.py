"""Multi-head attention layer whose kernel is a registry name or a flax-style callable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from attn_jax import kernels
from attn_jax.kernels.performer import orthogonal_features
from attn_jax.models import attention_core as core
from attn_jax.models.attention_core import SINKS, VISIBILITY_KWARGS
from attn_jax.models.positions import apply_rope

__all__ = ["SINKS", "VISIBILITY_KWARGS", "MultiHeadAttention", "freeze_kwargs"]


def freeze_kwargs(kwargs: Mapping[str, Any] | None) -> FrozenDict | None:
    """``kwargs`` as an immutable, hashable mapping (lists become tuples), so modules and
    options holding them can be static arguments of ``jax.jit``."""
    if kwargs is None:
        return None

    def frozen(value):
        if isinstance(value, list | tuple):
            return tuple(frozen(v) for v in value)
        if isinstance(value, Mapping):
            return FrozenDict({k: frozen(v) for k, v in value.items()})
        return value

    out = FrozenDict({str(k): frozen(v) for k, v in dict(kwargs).items()})
    try:
        hash(out)
    except TypeError as error:
        raise ValueError(
            f"attention_kwargs: every value must be hashable (numbers, strings, tuples, "
            f"functions), got {dict(kwargs)!r}: {error}"
        ) from None
    return out


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with separate query and key/value heads (GQA/MQA).

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads (default ``num_heads``); ``num_heads % num_kv_heads == 0``.
      head_dim: features per head (default ``inputs_q.shape[-1] // num_heads``).
      out_features: output features (default: those of ``inputs_q``).
      attention: registry name of a ``dot_product``-interface kernel (default ``"auto"``:
        the fastest exact kernel for the backend and shape), or a flax-style
        ``attention_fn(query, key, value, bias=None, mask=None, ...)`` callable (it gets a
        dense boolean mask, and ``dropout_rng`` / ``dropout_rate`` / ``deterministic`` /
        ``module`` where its signature takes them, as flax's attention modules do).
      attention_kwargs: extra keyword arguments for the kernel (e.g. a window, block
        sizes), held as an immutable mapping (the module stays hashable).
      is_causal: causal self-attention.
      cross_attention: the layer attends to a memory (encoder-decoder); when decoding, the
        memory's keys/values are cached by the first call and read by later calls made
        with ``inputs_kv=None``.
      rope: rotate queries and keys with RoPE (self-attention).
      dropout_rate: dropout on the attention weights (needs a ``'dropout'`` rng).
      logits_soft_cap: ``cap``: logits become ``cap * tanh(logits / cap)`` (Gemma 2).
      sinks: attention sinks: ``"none"``, ``"learned"`` (a ``sinks [num_heads]`` logit
        parameter, initialised to 0) or ``"plus_one"`` (a fixed zero logit: "softmax + 1").
        Decoding from the cache keeps them.
      kv_budget, kv_recent: H2O-style eviction when decoding from a KV cache (Zhang et al.
        2023): each sequence keeps at most ``kv_budget`` cached tokens, its ``kv_recent``
        latest and the heaviest hitters by accumulated attention mass (summed over the
        queries so far and the heads, ``return_attention_mass``); evicted tokens are
        hidden from every later query (``kv_recent == kv_budget``: a sliding window).
        ``None``: keep everything.
      use_bias: biases in the projections.
      dtype: compute dtype (default: the inputs'); param_dtype: parameter dtype.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    attention: str | Callable[..., Any] = "auto"
    attention_kwargs: Mapping[str, Any] | None = None
    is_causal: bool = False
    cross_attention: bool = False
    rope: bool = False
    dropout_rate: float = 0.0
    logits_soft_cap: float | None = None
    sinks: str = "none"
    kv_budget: int | None = None
    kv_recent: int = 0
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "attention_kwargs", freeze_kwargs(self.attention_kwargs))
        super().__post_init__()

    def _features(self) -> dict[str, Any]:
        """The kernel arguments of the soft cap and the sinks."""
        if self.sinks not in SINKS:
            raise ValueError(
                f"MultiHeadAttention: attribute 'sinks' must be one of {SINKS}, got {self.sinks!r}"
            )
        features: dict[str, Any] = {}
        if self.logits_soft_cap is not None:
            features["logits_soft_cap"] = self.logits_soft_cap
        if self.sinks == "learned":
            features["sinks"] = self.param("sinks", nn.initializers.zeros, (self.num_heads,))
        elif self.sinks == "plus_one":
            features["sinks"] = 0.0
        if features and callable(self.attention):
            raise ValueError(
                "MultiHeadAttention: logits_soft_cap and sinks need a registered kernel, "
                "not an attention_fn callable"
            )
        return features

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
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
        """Attends from ``inputs_q`` to ``inputs_kv`` (default: self-attention).

        Args:
          inputs_q: ``[batch, q_len, features]``.
          inputs_kv: ``[batch, kv_len, kv_features]``; ``None`` for self-attention (and,
            with ``cross_attention`` when decoding, for the cached memory).
          mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``; True = attend.
            A key-padding mask ``[batch, 1, 1, kv_len]`` reaches kernels that take no mask
            as valid lengths (``key_value_seq_lengths``: right padding).
          kv_lengths: ``[batch]`` valid lengths of right-padded keys/values.
          positions: ``[batch, q_len]`` integer positions for RoPE (default ``0..q_len-1``,
            continuing each sequence's cache when decoding).
          segment_ids: ``[batch, q_len]`` segment ids of packed self-attention: tokens only
            attend within their segment.
          lengths: ``[batch]`` when decoding: how many of the ``q_len`` new tokens of each
            sequence are real (the others are right padding, cached as zeros; default all).
          deterministic: disables dropout.
          sow_weights: record the weights ``[batch, heads, q_len, kv_len]`` in
            ``('intermediates', 'attention_weights')``.
          decode: autoregressive decoding (``'cache'`` collection, see
            :mod:`attn_jax.models.kv_cache` for the kernels' forms): the first call
            (``init``, or :func:`attn_jax.decode.init_cache`) sizes the cache by its input
            length; later calls append their tokens (a whole prompt, then one token at a
            time) and attend to everything cached so far, sequence by sequence.

        Returns:
          ``[batch, q_len, out_features]``.
        """
        chex.assert_rank(inputs_q, 3, custom_message="inputs_q: expected [batch, q_len, features]")
        self_attention = inputs_kv is None and not self.cross_attention
        spec = core.kernel_spec(self.attention, "MultiHeadAttention")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(
                f"MultiHeadAttention: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({kv_heads})"
            )
        features = inputs_q.shape[-1]
        head_dim = self.head_dim or features // self.num_heads
        dense = lambda heads, name: nn.DenseGeneral(
            (heads, head_dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        query = dense(self.num_heads, "query")(inputs_q)
        key_layer, value_layer = dense(kv_heads, "key"), dense(kv_heads, "value")
        options = {**dict(self.attention_kwargs or {}), **self._features()}
        if spec is not None and "projection" in spec.options and "projection" not in options:
            options["projection"] = self._random_features(options, head_dim)

        if self_attention:
            source = inputs_q
        elif inputs_kv is None:  # cross-attention reading its decoding cache
            if not (decode and self.has_variable("cache", "cross_key")):
                raise ValueError(
                    "MultiHeadAttention: inputs_kv=None with cross_attention=True needs "
                    "decode=True and a cache filled by a call with the memory"
                )
            source = None
        else:
            chex.assert_rank(
                inputs_kv, 3, custom_message="inputs_kv: expected [batch, kv_len, features]"
            )
            source = inputs_kv
        key = None if source is None else key_layer(source)
        value = None if source is None else value_layer(source)
        if not self_attention:
            for name in VISIBILITY_KWARGS:  # windows and alignments relate self-positions
                options.pop(name, None)
            if decode:
                key, value = self._cross_cache(key, value)

        request: dict[str, Any] = {}
        q_len = query.shape[1]
        if self_attention and decode and self.has_variable("cache", "cache_lengths"):
            out = self._decode(spec, query, key, value, mask, positions, lengths, options)
        else:
            if self_attention:
                if positions is None:
                    positions = jnp.arange(q_len, dtype=jnp.int32)[None, :]
                if self.rope:
                    query, key = apply_rope(query, positions), apply_rope(key, positions)
                if self.is_causal:
                    request["is_causal"] = True
                if segment_ids is not None:
                    request["query_segment_ids"] = segment_ids
                if decode:  # initialisation: size the cache by this input
                    self._make_cache(spec, key, value, options)
            elif segment_ids is not None:
                raise ValueError("MultiHeadAttention: segment_ids are for self-attention")
            if kv_lengths is not None:
                request["key_value_seq_lengths"] = kv_lengths
            out = self._attend(spec, query, key, value, mask, request, options, deterministic,
                               sow_weights)  # fmt: skip
        return nn.DenseGeneral(
            self.out_features or features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)

    # ------------------------------------------------------------------------ kernels

    def _random_features(self, options: dict[str, Any], head_dim: int) -> jax.Array:
        """A random-feature kernel's projection, drawn once from the ``params`` rng (it
        changes with the seed, then stays fixed: no gradient, no weight decay)."""
        count = int(options.pop("num_features", 256))
        table = self.param(
            "random_features",
            lambda rng: orthogonal_features(rng, count, head_dim),
        )
        return jax.lax.stop_gradient(table)

    def _attend(
        self,
        spec: kernels.KernelSpec | None,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None,
        request: dict[str, Any],
        options: dict[str, Any],
        deterministic: bool,
        sow_weights: bool,
        finite_kv_padding: bool = False,
        return_mass: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """:func:`attention_core.attend` with this layer's kernel, dropout and sowing."""
        dropout = {}
        if self.dropout_rate > 0.0 and not deterministic:
            dropout = {"dropout_rate": self.dropout_rate, "dropout_rng": self.make_rng("dropout")}
        weights = sow_weights and spec is not None
        out = core.attend(
            self.attention, spec, query, key, value, mask, request, options,
            dropout=dropout, deterministic=deterministic, return_weights=weights,
            module=self if sow_weights else None, finite_kv_padding=finite_kv_padding,
            return_mass=return_mass,
        )  # fmt: skip
        if weights:
            out, attention_weights = out
            self.sow("intermediates", "attention_weights", attention_weights)
        return out

    # ------------------------------------------------------------------------ decoding

    def _make_cache(self, spec, key: jax.Array, value: jax.Array, options: dict[str, Any]):
        """Creates the cache variables for a cache of ``key.shape[1]`` positions."""
        cache = core.init_cache(self.attention, spec, key, value, options, self.kv_budget)
        for name, initial in cache.items():
            self.variable("cache", name, lambda initial=initial: initial)

    def _cross_cache(self, key, value):
        """Cross-attention keys/values: computed from the memory once, then read."""
        if key is None:
            cached = lambda name: self.get_variable("cache", name)
            return cached("cross_key"), cached("cross_value")
        cached_key = self.variable("cache", "cross_key", lambda: key)
        cached_value = self.variable("cache", "cross_value", lambda: value)
        cached_key.value, cached_value.value = key, value
        return key, value

    def _decode(self, spec, query, key, value, mask, positions, lengths, options):
        """One decoding call (:func:`attention_core.decode_step` over the ``'cache'``
        collection): ``q_len`` new tokens per sequence (``lengths`` real ones)."""
        cache = dict(self.variables["cache"])

        def attend_fn(query, keys, values, mask, request, **hints):
            return self._attend(spec, query, keys, values, mask, request, options, True,
                                False, **hints)  # fmt: skip

        out, cache = core.decode_step(
            cache, self.attention, spec, query, key, value, mask=mask, positions=positions,
            lengths=lengths, options=options, is_causal=self.is_causal, rope=self.rope,
            kv_budget=self.kv_budget, kv_recent=self.kv_recent, attend_fn=attend_fn,
        )  # fmt: skip
        for name, updated in cache.items():
            self.put_variable("cache", name, updated)
        return out
