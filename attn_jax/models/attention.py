"""Multi-head attention layer whose kernel is a registry name or a flax-style callable."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from attn_jax import kernels
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.performer import orthogonal_features
from attn_jax.models import kv_cache
from attn_jax.models.positions import apply_rope

__all__ = ["VISIBILITY_KWARGS", "MultiHeadAttention", "freeze_kwargs"]

# attention_kwargs that say who sees whom (the rest are the kernel's own options).
VISIBILITY_KWARGS = ("local_window_size", "causal_alignment")


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

    def _spec(self) -> kernels.KernelSpec | None:
        """The registered kernel, or ``None`` for a callable."""
        if callable(self.attention):
            return None
        spec = kernels.spec(self.attention)
        if spec.capabilities.interface != "dot_product":
            raise ValueError(
                f"MultiHeadAttention: attribute 'attention' must name a dot_product kernel, "
                f"got {self.attention!r} (interface {spec.capabilities.interface!r})"
            )
        return spec

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
        spec = self._spec()
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
        """Calls the kernel with the visibility arguments in the form it takes
        (``finite_kv_padding``: the keys and values no query sees are known finite, e.g.
        a decoding cache's; ``return_mass``: also the attention mass ``[batch, heads,
        kv_len]``)."""
        request = dict(request)
        options = dict(options)
        for name in VISIBILITY_KWARGS:
            if name in options:
                request[name] = options.pop(name)
        dropout = {}
        if self.dropout_rate > 0.0 and not deterministic:
            dropout = {"dropout_rate": self.dropout_rate, "dropout_rng": self.make_rng("dropout")}
        if spec is None:  # a flax-style callable: a dense mask, flax's arguments
            mask = _dense_mask(query, key, mask, request)
            return _call_flax_style(
                self.attention, query, key, value, mask, dropout, deterministic,
                self if sow_weights else None, options,
            )  # fmt: skip
        caps = spec.capabilities
        key_padding = mask is not None and mask.ndim == 4 and mask.shape[1:3] == (1, 1)
        if key_padding and not caps.mask:
            lengths = mask[:, 0, 0, :].sum(-1).astype(jnp.int32)
            old = request.get("key_value_seq_lengths")
            request["key_value_seq_lengths"] = lengths if old is None else jnp.minimum(old, lengths)
            mask = None
        if not _honours(caps, request) and caps.mask:
            mask, request = _dense_mask(query, key, mask, request), {}
        if mask is not None:
            request["mask"] = mask
        if finite_kv_padding and spec.core is not None:  # front-end kernels take the hint
            request["finite_kv_padding"] = True
        if return_mass:
            request["return_attention_mass"] = True
        if sow_weights:
            if not caps.weights:
                raise ValueError(
                    f"MultiHeadAttention: kernel {self.attention!r} cannot return weights "
                    "(sow_weights=True)"
                )
            out, weights = spec.fn(
                query, key, value, return_weights=True, **request, **dropout, **options
            )
            self.sow("intermediates", "attention_weights", weights)
            return out
        return spec.fn(query, key, value, **request, **dropout, **options)

    # ------------------------------------------------------------------------ decoding

    def _make_cache(self, spec, key: jax.Array, value: jax.Array, options: dict[str, Any]):
        """Creates the cache variables for a cache of ``key.shape[1]`` positions."""
        batch, max_len = key.shape[:2]
        form = "kv_cache" if spec is None else spec.capabilities.decode
        self.variable("cache", "cache_lengths", lambda: jnp.zeros((batch,), jnp.int32))
        if form == "recurrent":
            opts = {k: v for k, v in options.items() if k not in VISIBILITY_KWARGS}
            state = spec.recurrent.init(batch, key.shape[2], key.shape[3], value.shape[3], opts)
            self.variable("cache", "state", lambda: state)
            return
        slots = max_len
        if form == "rolling_cache":
            slots = kv_cache.rolling_slots(
                max_len, vis.normalize_window(options.get("local_window_size"))
            )
            # Positions + 1, so that an all-zero cache (decode.init_cache) is empty.
            self.variable("cache", "cached_positions", jnp.zeros, (batch, slots), jnp.int32)
        if form == "rolling_cache":
            shape = lambda x: (batch, slots, *x.shape[2:])
        else:  # head-major: see kv_cache.append_kv
            shape = lambda x: (batch, x.shape[2], slots, x.shape[3])
        self.variable("cache", "cached_key", jnp.zeros, shape(key), key.dtype)
        self.variable("cache", "cached_value", jnp.zeros, shape(value), value.dtype)
        if self.kv_budget is not None:
            if form != "kv_cache":
                raise ValueError(
                    f"MultiHeadAttention: kv_budget needs a kernel that decodes from a KV "
                    f"cache; {self.attention!r} decodes from a {form!r}"
                )
            self.variable("cache", "cache_mass", jnp.zeros, (batch, slots), jnp.float32)
            self.variable("cache", "evicted", jnp.zeros, (batch, slots), bool)

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
        """One decoding call: ``q_len`` new tokens per sequence (``lengths`` real ones)."""
        batch, q_len = query.shape[:2]
        cache_lengths = self.variable("cache", "cache_lengths")
        start = cache_lengths.value
        count = jnp.full((batch,), q_len, jnp.int32) if lengths is None else lengths
        steps = jnp.arange(q_len, dtype=jnp.int32)[None, :]
        query_positions = start[:, None] + steps
        if positions is None:
            positions = query_positions
        if self.rope:  # keys are rotated at their own positions before they are cached
            query, key = apply_rope(query, positions), apply_rope(key, positions)
        cache_lengths.value = start + count
        form = "kv_cache" if spec is None else spec.capabilities.decode
        if form == "recurrent":
            if not self.is_causal:
                raise ValueError(
                    f"MultiHeadAttention: kernel {self.attention!r} decodes from a recurrent "
                    "state, which needs is_causal=True"
                )
            if mask is not None:
                raise ValueError(f"MultiHeadAttention: kernel {self.attention!r} takes no mask")
            state = self.variable("cache", "state")
            opts = {k: v for k, v in options.items() if k not in VISIBILITY_KWARGS}
            valid = None if lengths is None else steps < count[:, None]
            out, state.value = spec.recurrent.step(
                state.value, query, key, value, valid=valid, options=opts
            )
            return out.astype(query.dtype)
        cached_key = self.variable("cache", "cached_key")
        cached_value = self.variable("cache", "cached_value")
        request: dict[str, Any] = {"query_positions": query_positions}
        if self.is_causal:
            request["is_causal"] = True
        if lengths is not None:
            request["query_seq_lengths"] = count
            # Padding is never cached as anything but zeros, so that the cache's unseen
            # slots are finite and the kernel need not zero all of it at every step.
            real = (steps < count[:, None])[:, :, None, None]
            key, value = jnp.where(real, key, 0), jnp.where(real, value, 0)
        if form == "rolling_cache":
            stored = self.variable("cache", "cached_positions")
            fresh = jnp.where(steps < count[:, None], query_positions, kv_cache.EMPTY)
            keys = jnp.concatenate([cached_key.value, key.astype(cached_key.value.dtype)], 1)
            values = jnp.concatenate(
                [cached_value.value, value.astype(cached_value.value.dtype)], 1
            )
            old = jnp.where(stored.value > 0, stored.value - 1, kv_cache.EMPTY)
            kv_positions = jnp.concatenate([old, fresh], 1)
            request["key_value_positions"] = kv_positions
            slots = stored.value.shape[1]
            cached_key.value, cached_value.value, kept = kv_cache.roll_in(
                keys, values, kv_positions, slots
            )
            stored.value = jnp.where(kept == kv_cache.EMPTY, 0, kept + 1)
        else:
            cached_key.value = kv_cache.append_kv(cached_key.value, key, start)
            cached_value.value = kv_cache.append_kv(cached_value.value, value, start)
            keys, values = kv_cache.tokens_major(cached_key.value, cached_value.value)
            request["key_value_seq_lengths"] = start + count
        # What no query sees is then the cache's zeros or earlier real tokens, unless a mask
        # hides tokens (which may be padding the caller marked by the mask alone).
        finite = mask is None
        if self.kv_budget is None or form != "kv_cache":
            return self._attend(spec, query, keys, values, mask, request, options, True, False,
                                finite_kv_padding=finite)  # fmt: skip
        evicted = self.variable("cache", "evicted")
        kept = ~evicted.value[:, None, None, :]
        mask = kept if mask is None else mask & kept
        out, mass = self._attend(spec, query, keys, values, mask, request, options, True,
                                 False, finite_kv_padding=finite, return_mass=True)  # fmt: skip
        total = self.variable("cache", "cache_mass")
        total.value = total.value + mass.sum(1)
        evicted.value = heavy_hitter_evictions(
            total.value, evicted.value, start + count, self.kv_budget, self.kv_recent
        )
        return out


SINKS = ("none", "learned", "plus_one")


def heavy_hitter_evictions(
    mass: jax.Array, evicted: jax.Array, lengths: jax.Array, budget: int, recent: int
) -> jax.Array:
    """H2O's policy: ``evicted [batch, slots]`` after evicting, from each sequence's
    ``lengths`` cached tokens, all but its ``recent`` latest and the ``budget - recent``
    kept ones of largest accumulated ``mass [batch, slots]``."""
    slots = jnp.arange(mass.shape[1], dtype=jnp.int32)[None, :]
    valid = slots < lengths[:, None]
    latest = slots >= lengths[:, None] - recent
    candidates = valid & ~evicted & ~latest
    score = jnp.where(candidates, mass, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)  # 0 = the heaviest
    return evicted | (candidates & (rank >= budget - recent))


def _honours(caps: kernels.Capabilities, request: dict[str, Any]) -> bool:
    """Whether a kernel takes every visibility argument of ``request`` itself."""
    governed = {a: c for c, args in kernels.registry.CAPABILITY_ARGUMENTS.items() for a in args}
    return all(
        getattr(caps, governed[name])
        for name, value in request.items()
        if name in governed and kernels.registry.is_active(name, value)
    )


def _dense_mask(query, key, mask, request: dict[str, Any]) -> jax.Array | None:
    """The visibility of ``request`` (and ``mask``) as one ``[batch, 1 or heads, q, kv]``
    boolean mask: the form of kernels that take masks but not positions or segments."""
    batch, q_len, heads = query.shape[:3]
    kv_len = key.shape[1]
    visibility = vis.build((batch,), heads, q_len, kv_len, mask=mask, **request)
    return visibility.dense_mask()


def _call_flax_style(fn, query, key, value, mask, dropout, deterministic, module, options):
    """Calls a flax ``attention_fn`` with the arguments its signature takes."""
    parameters = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    kwargs = {"mask": mask, "deterministic": deterministic, **dropout, **options}
    if module is not None:
        kwargs["module"] = module
    for name in list(kwargs):
        if not takes_all and name not in parameters:
            if name in ("deterministic",) or (name == "mask" and kwargs[name] is None):
                kwargs.pop(name)
            else:
                raise ValueError(
                    f"MultiHeadAttention: attention callable {fn!r} has no argument {name!r}"
                )
    return fn(query, key, value, **kwargs)
