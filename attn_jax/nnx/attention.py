"""Multi-head attention as a Flax NNX module, with the linen layer's parameters and cache."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.kernels.performer import orthogonal_features
from attn_jax.models import attention_core as core
from attn_jax.models.attention import freeze_kwargs
from attn_jax.models.positions import apply_rope

__all__ = ["MultiHeadAttention", "dropout_key"]


def dropout_key(rngs: nnx.Rngs | jax.Array | None, owner: str) -> jax.Array:
    """A key for dropout from a call's ``rngs`` (an :class:`flax.nnx.Rngs` with a
    ``dropout`` stream, or a key); ``owner`` names the module in the error."""
    if rngs is None:
        raise ValueError(
            f"{owner}: dropout with deterministic=False needs the call argument 'rngs' "
            "(an nnx.Rngs with a 'dropout' stream, or a key)"
        )
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    return rngs


class MultiHeadAttention(nnx.Module):
    """Self- or cross-attention with separate query and key/value heads (GQA/MQA), the NNX
    twin of :class:`attn_jax.models.MultiHeadAttention`: the same attributes, the same
    parameters (``query / key / value`` kernels ``[in_features, heads, head_dim]``, ``out``
    ``[heads, head_dim, out_features]``, ``sinks [num_heads]``, ``random_features``), the
    same call arguments and the same cache entries (:mod:`attn_jax.models.attention_core`).

    Args:
      num_heads: query heads.
      in_features: features of the queries' inputs (linen infers them at ``init``).
      kv_features: features of the keys' inputs (default ``in_features``).
      rngs: parameter initialisation (``rngs.params()``).
      The other arguments are the linen layer's attributes.

    Decoding: :meth:`init_cache` makes an empty cache (self-attention) or fills the
    memory's keys/values (cross-attention); calls with ``decode=True`` then append their
    tokens and attend to everything cached so far, sequence by sequence.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kv_features: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        attention: str | Callable[..., Any] = "auto",
        attention_kwargs: Mapping[str, Any] | None = None,
        is_causal: bool = False,
        cross_attention: bool = False,
        rope: bool = False,
        dropout_rate: float = 0.0,
        logits_soft_cap: float | None = None,
        sinks: str = "none",
        kv_budget: int | None = None,
        kv_recent: int = 0,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kv_heads = num_kv_heads or num_heads
        if num_heads % kv_heads:
            raise ValueError(
                f"MultiHeadAttention: num_heads ({num_heads}) must be a multiple of "
                f"num_kv_heads ({kv_heads})"
            )
        if sinks not in core.SINKS:
            raise ValueError(
                f"MultiHeadAttention: argument 'sinks' must be one of {core.SINKS}, got {sinks!r}"
            )
        spec = core.kernel_spec(attention, "MultiHeadAttention")  # checks the name
        if callable(attention) and (logits_soft_cap is not None or sinks != "none"):
            raise ValueError(
                "MultiHeadAttention: logits_soft_cap and sinks need a registered kernel, "
                "not an attention_fn callable"
            )
        self.num_heads, self.num_kv_heads = num_heads, kv_heads
        self.head_dim = head_dim or in_features // num_heads
        self.attention = attention
        self.attention_kwargs = freeze_kwargs(attention_kwargs)
        self.is_causal, self.cross_attention, self.rope = is_causal, cross_attention, rope
        self.dropout_rate = dropout_rate
        self.logits_soft_cap, self.sink_mode = logits_soft_cap, sinks
        self.kv_budget, self.kv_recent = kv_budget, kv_recent
        self.out_features, self.use_bias = out_features, use_bias
        self.dtype, self.param_dtype = dtype, param_dtype
        self.cache_names: tuple[str, ...] = ()
        dense = lambda features, heads: nnx.LinearGeneral(
            features,
            (heads, self.head_dim),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.query = dense(in_features, num_heads)
        self.key = dense(kv_features or in_features, kv_heads)
        self.value = dense(kv_features or in_features, kv_heads)
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim),
            out_features or in_features,
            axis=(-2, -1),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if sinks == "learned":
            self.sinks = nnx.Param(jnp.zeros((num_heads,), jnp.float32))
        options = dict(self.attention_kwargs or {})
        if spec is not None and "projection" in spec.options and "projection" not in options:
            count = int(options.get("num_features", 256))
            self.random_features = nnx.Param(
                orthogonal_features(rngs.params(), count, self.head_dim)
            )

    @property
    def spec(self):
        """The registered kernel's spec, or ``None`` for a callable."""
        return core.kernel_spec(self.attention, "MultiHeadAttention")

    def _options(self, self_attention: bool) -> dict[str, Any]:
        """The kernel's options: ``attention_kwargs``, the soft cap, the sinks, the random
        features (windows and alignments only for self-attention)."""
        options = dict(self.attention_kwargs or {})
        if self.logits_soft_cap is not None:
            options["logits_soft_cap"] = self.logits_soft_cap
        if self.sink_mode == "learned":
            options["sinks"] = self.sinks[...]
        elif self.sink_mode == "plus_one":
            options["sinks"] = 0.0
        if hasattr(self, "random_features"):
            options.pop("num_features", None)
            options["projection"] = jax.lax.stop_gradient(self.random_features[...])
        if not self_attention:
            for name in core.VISIBILITY_KWARGS:
                options.pop(name, None)
        return options

    # ------------------------------------------------------------------------ cache

    def init_cache(
        self,
        batch: int,
        max_len: int,
        *,
        memory: jax.Array | None = None,
        dtype: Any = None,
    ) -> None:
        """An empty cache of ``max_len`` positions for ``batch`` sequences (self-attention),
        or the keys/values of ``memory [batch, src_len, kv_features]`` (cross-attention);
        ``dtype``: of the cached keys/values (default the compute dtype, else float32)."""
        if self.cross_attention:
            if memory is None:
                raise ValueError(
                    "MultiHeadAttention.init_cache: argument 'memory' is required with "
                    "cross_attention=True"
                )
            self._store({"cross_key": self.key(memory), "cross_value": self.value(memory)})
            return
        dtype = dtype or self.dtype or jnp.float32
        kv = jax.ShapeDtypeStruct((batch, max_len, self.num_kv_heads, self.head_dim), dtype)
        options = self._options(True)
        self._store(
            core.init_cache(self.attention, self.spec, kv, kv, options, self.kv_budget), True
        )

    def _store(self, cache: dict[str, Any], fresh: bool = False) -> None:
        names = tuple(cache) if fresh else tuple(dict.fromkeys((*self.cache_names, *cache)))
        self.cache_names = names
        for name, value in cache.items():
            if fresh or not hasattr(self, name):
                setattr(self, name, nnx.Cache(value))
            else:
                getattr(self, name).set_value(value)

    def _cache(self) -> dict[str, Any]:
        return {name: getattr(self, name).get_value() for name in self.cache_names}

    # ------------------------------------------------------------------------ call

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
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Attends from ``inputs_q [batch, q_len, features]`` to ``inputs_kv [batch, kv_len,
        kv_features]`` (default: self-attention); the arguments are those of
        :meth:`attn_jax.models.MultiHeadAttention.__call__`, plus ``rngs`` (dropout, when
        ``deterministic=False``). ``sow_weights`` records ``attention_weights [batch,
        heads, q_len, kv_len]`` as an :class:`flax.nnx.Intermediate` (read them with
        :func:`flax.nnx.capture`).

        Returns:
          ``[batch, q_len, out_features]``.
        """
        chex.assert_rank(inputs_q, 3, custom_message="inputs_q: expected [batch, q_len, features]")
        self_attention = inputs_kv is None and not self.cross_attention
        query = self.query(inputs_q)
        options = self._options(self_attention)
        if self_attention:
            key, value = self.key(inputs_q), self.value(inputs_q)
        elif inputs_kv is None:  # cross-attention reading its decoding cache
            if not (decode and "cross_key" in self.cache_names):
                raise ValueError(
                    "MultiHeadAttention: inputs_kv=None with cross_attention=True needs "
                    "decode=True and a cache filled by init_cache(..., memory=...)"
                )
            key, value = self.cross_key.get_value(), self.cross_value.get_value()
        else:
            chex.assert_rank(
                inputs_kv, 3, custom_message="inputs_kv: expected [batch, kv_len, features]"
            )
            key, value = self.key(inputs_kv), self.value(inputs_kv)
            if decode:
                self._store({"cross_key": key, "cross_value": value})
        dropout = {}
        if self.dropout_rate > 0.0 and not deterministic:
            key_ = dropout_key(rngs, "MultiHeadAttention")
            dropout = {"dropout_rate": self.dropout_rate, "dropout_rng": key_}

        def attend_fn(query, keys, values, mask, request, deterministic=True, dropout=None,
                      **hints):  # fmt: skip
            return core.attend(
                self.attention, self.spec, query, keys, values, mask, request, options,
                dropout=dropout or {}, deterministic=deterministic, **hints,
            )  # fmt: skip

        if self_attention and decode:
            if "cache_lengths" not in self.cache_names:
                raise ValueError(
                    "MultiHeadAttention: decode=True needs a cache: call init_cache(batch, "
                    "max_len) first (a model's init_cache for all its layers)"
                )
            out, cache = core.decode_step(
                self._cache(), self.attention, self.spec, query, key, value, mask=mask,
                positions=positions, lengths=lengths, options=options,
                is_causal=self.is_causal, rope=self.rope, kv_budget=self.kv_budget,
                kv_recent=self.kv_recent, attend_fn=attend_fn,
            )  # fmt: skip
            self._store(cache)
            return self.out(out)
        request: dict[str, Any] = {}
        if self_attention:
            if positions is None:
                positions = jnp.arange(query.shape[1], dtype=jnp.int32)[None, :]
            if self.rope:
                query, key = apply_rope(query, positions), apply_rope(key, positions)
            if self.is_causal:
                request["is_causal"] = True
            if segment_ids is not None:
                request["query_segment_ids"] = segment_ids
        elif segment_ids is not None:
            raise ValueError("MultiHeadAttention: segment_ids are for self-attention")
        if kv_lengths is not None:
            request["key_value_seq_lengths"] = kv_lengths
        if sow_weights and self.spec is None:
            raise ValueError(
                "MultiHeadAttention: sow_weights=True needs a registered kernel, not an "
                "attention_fn callable"
            )
        out = attend_fn(query, key, value, mask, request, deterministic, dropout,
                        return_weights=sow_weights)  # fmt: skip
        if sow_weights:
            out, weights = out
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return self.out(out)
