"""The framework-free core of the multi-head attention layers: calling a kernel with the
visibility arguments in the form it takes, and decoding from a cache.

Both layers, :class:`attn_jax.models.MultiHeadAttention` (linen) and
:class:`attn_jax.nnx.MultiHeadAttention` (NNX), project, then call these pure functions; a
cache is a plain dict of arrays (the linen layer keeps its entries in the ``'cache'``
collection, the NNX layer as :class:`flax.nnx.Cache` attributes of the same names), so
the two layers decode identically and their caches convert one to one.

Cache entries (see :mod:`attn_jax.models.kv_cache` for the forms):

- every form: ``cache_lengths [batch]``, the tokens cached per sequence;
- ``kv_cache``: ``cached_key / cached_value [batch, kv_heads, max_len, dim]``, with
  ``cache_mass / evicted [batch, max_len]`` under a ``kv_budget``;
- ``rolling_cache``: ``cached_key / cached_value [batch, slots, kv_heads, dim]`` and
  ``cached_positions [batch, slots]`` (positions + 1; 0 is empty);
- ``recurrent``: ``state``, the kernel's running sums.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax import kernels
from attn_jax.kernels import visibility as vis
from attn_jax.models import kv_cache
from attn_jax.models.positions import apply_rope

__all__ = [
    "SINKS",
    "VISIBILITY_KWARGS",
    "attend",
    "decode_step",
    "heavy_hitter_evictions",
    "init_cache",
]

# attention_kwargs that say who sees whom (the rest are the kernel's own options).
VISIBILITY_KWARGS = ("local_window_size", "causal_alignment")
SINKS = ("none", "learned", "plus_one")

Attend = Callable[..., Any]


def kernel_spec(attention: str | Callable[..., Any], layer: str) -> kernels.KernelSpec | None:
    """The registered ``dot_product`` kernel named ``attention``, or ``None`` for a
    callable; ``layer`` names the layer in errors."""
    if callable(attention):
        return None
    spec = kernels.spec(attention)
    if spec.capabilities.interface != "dot_product":
        raise ValueError(
            f"{layer}: attribute 'attention' must name a dot_product kernel, "
            f"got {attention!r} (interface {spec.capabilities.interface!r})"
        )
    return spec


def attend(
    attention: str | Callable[..., Any],
    spec: kernels.KernelSpec | None,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    request: dict[str, Any],
    options: dict[str, Any],
    *,
    dropout: dict[str, Any],
    deterministic: bool = True,
    return_weights: bool = False,
    module: Any = None,
    finite_kv_padding: bool = False,
    return_mass: bool = False,
) -> Any:
    """Calls the kernel with the visibility arguments in the form it takes.

    Args:
      attention / spec: the layer's kernel: a registry name and its spec, or a flax-style
        callable and ``None``.
      query: ``[batch, q_len, heads, head_dim]``; key / value ``[batch, kv_len, kv_heads,
        head_dim]``.
      mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, or ``None``.
      request: visibility arguments of the kernel front end (``is_causal``, positions,
        lengths, segment ids); options: the kernel's own options (the
        :data:`VISIBILITY_KWARGS` among them move to ``request``).
      dropout: ``{"dropout_rate", "dropout_rng"}`` or ``{}``.
      return_weights: also return the weights ``[batch, heads, q_len, kv_len]``.
      module: passed to a callable that sows (flax's ``module`` argument).
      finite_kv_padding: the keys and values no query sees are known finite (a cache's).
      return_mass: also return the attention mass ``[batch, heads, kv_len]``.

    Returns:
      ``[batch, q_len, heads, head_dim]``, or a pair with the weights or the mass.
    """
    request = dict(request)
    options = dict(options)
    for name in VISIBILITY_KWARGS:
        if name in options:
            request[name] = options.pop(name)
    if spec is None:  # a flax-style callable: a dense mask, flax's arguments
        mask = _dense_mask(query, key, mask, request)
        return _call_flax_style(
            attention, query, key, value, mask, dropout, deterministic, module, options
        )
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
    if return_weights:
        if not caps.weights:
            raise ValueError(
                f"MultiHeadAttention: kernel {attention!r} cannot return weights (sow_weights=True)"
            )
        request["return_weights"] = True
    return spec.fn(query, key, value, **request, **dropout, **options)


def init_cache(
    attention: str | Callable[..., Any],
    spec: kernels.KernelSpec | None,
    key: jax.Array | jax.ShapeDtypeStruct,
    value: jax.Array | jax.ShapeDtypeStruct,
    options: dict[str, Any],
    kv_budget: int | None = None,
) -> dict[str, Any]:
    """An empty cache (zeros) for ``key.shape[1]`` positions of keys ``[batch, max_len,
    kv_heads, key_dim]`` and values ``[batch, max_len, kv_heads, value_dim]`` (only their
    shapes and dtypes are read)."""
    batch, max_len = key.shape[:2]
    form = "kv_cache" if spec is None else spec.capabilities.decode
    cache: dict[str, Any] = {"cache_lengths": jnp.zeros((batch,), jnp.int32)}
    if form == "recurrent":
        opts = {k: v for k, v in options.items() if k not in VISIBILITY_KWARGS}
        cache["state"] = spec.recurrent.init(
            batch, key.shape[2], key.shape[3], value.shape[3], opts
        )
        return cache
    if form == "rolling_cache":
        slots = kv_cache.rolling_slots(
            max_len, vis.normalize_window(options.get("local_window_size"))
        )
        # Positions + 1, so that an all-zero cache (decode.init_cache) is empty.
        cache["cached_positions"] = jnp.zeros((batch, slots), jnp.int32)
        shape = lambda x: (batch, slots, *x.shape[2:])
    else:  # head-major: see kv_cache.append_kv
        slots = max_len
        shape = lambda x: (batch, x.shape[2], slots, x.shape[3])
    cache["cached_key"] = jnp.zeros(shape(key), key.dtype)
    cache["cached_value"] = jnp.zeros(shape(value), value.dtype)
    if kv_budget is not None:
        if form != "kv_cache":
            raise ValueError(
                f"MultiHeadAttention: kv_budget needs a kernel that decodes from a KV "
                f"cache; {attention!r} decodes from a {form!r}"
            )
        cache["cache_mass"] = jnp.zeros((batch, slots), jnp.float32)
        cache["evicted"] = jnp.zeros((batch, slots), bool)
    return cache


def decode_step(
    cache: dict[str, Any],
    attention: str | Callable[..., Any],
    spec: kernels.KernelSpec | None,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None,
    positions: jax.Array | None,
    lengths: jax.Array | None,
    options: dict[str, Any],
    is_causal: bool,
    rope: bool,
    kv_budget: int | None,
    kv_recent: int,
    attend_fn: Attend,
) -> tuple[jax.Array, dict[str, Any]]:
    """One decoding call: ``q_len`` new tokens per sequence (``lengths [batch]`` real ones).

    Args:
      cache: the layer's cache (:func:`init_cache`).
      query: ``[batch, q_len, heads, head_dim]``, key / value ``[batch, q_len, kv_heads,
        head_dim]``, projected, not yet rotated.
      positions: ``[batch, q_len]`` RoPE positions (default: continuing each sequence).
      attend_fn: ``(query, keys, values, mask, request, finite_kv_padding=...,
        return_mass=...)``: :func:`attend` with the layer's kernel and options bound.

    Returns:
      ``([batch, q_len, heads, head_dim], the updated cache)``.
    """
    cache = dict(cache)
    batch, q_len = query.shape[:2]
    start = cache["cache_lengths"]
    count = jnp.full((batch,), q_len, jnp.int32) if lengths is None else lengths
    steps = jnp.arange(q_len, dtype=jnp.int32)[None, :]
    query_positions = start[:, None] + steps
    if positions is None:
        positions = query_positions
    if rope:  # keys are rotated at their own positions before they are cached
        query, key = apply_rope(query, positions), apply_rope(key, positions)
    cache["cache_lengths"] = start + count
    form = "kv_cache" if spec is None else spec.capabilities.decode
    if form == "recurrent":
        if not is_causal:
            raise ValueError(
                f"MultiHeadAttention: kernel {attention!r} decodes from a recurrent "
                "state, which needs is_causal=True"
            )
        if mask is not None:
            raise ValueError(f"MultiHeadAttention: kernel {attention!r} takes no mask")
        opts = {k: v for k, v in options.items() if k not in VISIBILITY_KWARGS}
        valid = None if lengths is None else steps < count[:, None]
        out, cache["state"] = spec.recurrent.step(
            cache["state"], query, key, value, valid=valid, options=opts
        )
        return out.astype(query.dtype), cache
    request: dict[str, Any] = {"query_positions": query_positions}
    if is_causal:
        request["is_causal"] = True
    if lengths is not None:
        request["query_seq_lengths"] = count
        # Padding is never cached as anything but zeros, so that the cache's unseen
        # slots are finite and the kernel need not zero all of it at every step.
        real = (steps < count[:, None])[:, :, None, None]
        key, value = jnp.where(real, key, 0), jnp.where(real, value, 0)
    cached_key, cached_value = cache["cached_key"], cache["cached_value"]
    if form == "rolling_cache":
        stored = cache["cached_positions"]
        fresh = jnp.where(steps < count[:, None], query_positions, kv_cache.EMPTY)
        keys = jnp.concatenate([cached_key, key.astype(cached_key.dtype)], 1)
        values = jnp.concatenate([cached_value, value.astype(cached_value.dtype)], 1)
        old = jnp.where(stored > 0, stored - 1, kv_cache.EMPTY)
        kv_positions = jnp.concatenate([old, fresh], 1)
        request["key_value_positions"] = kv_positions
        cache["cached_key"], cache["cached_value"], kept = kv_cache.roll_in(
            keys, values, kv_positions, stored.shape[1]
        )
        cache["cached_positions"] = jnp.where(kept == kv_cache.EMPTY, 0, kept + 1)
    else:
        cache["cached_key"] = kv_cache.append_kv(cached_key, key, start)
        cache["cached_value"] = kv_cache.append_kv(cached_value, value, start)
        keys, values = kv_cache.tokens_major(cache["cached_key"], cache["cached_value"])
        request["key_value_seq_lengths"] = start + count
    # What no query sees is then the cache's zeros or earlier real tokens, unless a mask
    # hides tokens (which may be padding the caller marked by the mask alone).
    finite = mask is None
    if kv_budget is None or form != "kv_cache":
        out = attend_fn(query, keys, values, mask, request, finite_kv_padding=finite)
        return out, cache
    kept = ~cache["evicted"][:, None, None, :]
    mask = kept if mask is None else mask & kept
    out, mass = attend_fn(
        query, keys, values, mask, request, finite_kv_padding=finite, return_mass=True
    )
    cache["cache_mass"] = cache["cache_mass"] + mass.sum(1)
    cache["evicted"] = heavy_hitter_evictions(
        cache["cache_mass"], cache["evicted"], start + count, kv_budget, kv_recent
    )
    return out, cache


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
