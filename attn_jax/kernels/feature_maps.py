"""Attention through feature maps: ``out_i = phi(q_i) S / phi(q_i) z`` with
``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)`` (prefix sums when causal).

Shared by the ``linear`` (elu + 1) and ``performer`` (FAVOR+) kernels: time and memory are
linear in sequence length. They consume the visibility model in prefix form: validity
(padding) zeroes keys and output rows, causality is a running sum over positions in
order (chunks: exact masked products within a chunk, a running state between chunks).
Masks, windows and segments have no such form and are refused by their capabilities.

Exponential key features (FAVOR+) come as logarithms (``key_logits=True``) and are
exponentiated here after subtracting one shift per sequence and head: the largest valid
log-feature, if positive (else 0), so every key feature is at most 1. A constant over keys
and features cancels in the ratio, so outputs are exact and causal rows do not depend on
later keys' values; it keeps ``exp``, the sums and their gradients (which divide by the
denominator) finite. Causal passes and decoding carry the shift from chunk to chunk and
rescale the sums when it grows, as online softmax does (within a causal chunk the shift is
the chunk's: a key whose log-feature exceeds every earlier one's by more than ~80, far
beyond where FAVOR+ estimates anything, underflows the chunk's earlier rows).

:class:`Recurrence` is the same computation one step at a time, "Transformers are RNNs"
(Katharopoulos et al. 2020): a state of ``S`` and ``z`` per sequence, O(1) memory in the
sequence length and a per-token cost independent of it. Models decode with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels.api import AttentionCall

__all__ = ["Recurrence", "feature_attention", "prefix_attention"]

FeatureMap = Callable[..., jax.Array]  # (x [..., d], *, is_query, **options) -> [..., f]


def _divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num [..., dv] / den [...]``, 0 where ``den`` is 0.

    With small features (FAVOR+ queries far from every key), autodiff of a plain division
    squares ``den``, which underflows to 0 and turns gradients into NaN. Dividing
    both by a constant copy of ``den`` leaves the value and the true gradient
    (``-out / den`` for ``den``) but never squares a small number.
    """
    safe = jnp.where(den > 0, den, 1.0)[..., None]
    constant = jax.lax.stop_gradient(safe)
    return (num / constant) / (safe / constant)


def _shifted_keys(
    logits: jax.Array, shift: jax.Array, kv: jax.Array, norm: jax.Array, batch_axes: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Key features ``exp(logits - new shift)`` from log-features ``logits [*batch, n,
    kv_heads, f]`` (-inf: a key that does not count), the new shift ``max(shift, largest
    entry, 0)`` (``[*batch, kv_heads]``, no gradient) and the sums ``kv`` / ``norm`` taken
    with ``shift`` rescaled to it: ``(phi_k, kv, norm, new shift)``."""
    largest = jnp.max(logits, axis=(batch_axes, logits.ndim - 1))
    new = jax.lax.stop_gradient(jnp.maximum(shift, largest))
    factor = jnp.exp(shift - new)
    phi_k = jnp.exp(logits - new[..., None, :, None])
    return phi_k, kv * factor[..., None, None], norm * factor[..., None], new


def feature_attention(
    phi_q: jax.Array,
    phi_k: jax.Array,
    value: jax.Array,
    *,
    is_causal: bool,
    chunk_size: int = 64,
    precision: Sequence | None = None,
    state: tuple[jax.Array, ...] | None = None,
    key_logits: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Linear attention given non-negative features (zero for keys that must not count).

    Args:
      phi_q: ``[batch..., q_len, heads, features]`` query features (>= 0).
      phi_k: ``[batch..., kv_len, kv_heads, features]`` key features (>= 0), or with
        ``key_logits`` their logarithms (-inf for keys that must not count), exponentiated
        after subtracting a shift per sequence and head: the largest log-feature so far
        (each causal chunk takes the keys up to its end), at least 0.
      value: ``[batch..., kv_len, kv_heads, v_dim]``.
      is_causal: query ``i`` uses keys ``j <= i`` (``q_len == kv_len``).
      chunk_size: causal chunk length.
      state: ``(S [batch..., kv_heads, features, v_dim], z [batch..., kv_heads,
        features])`` of the keys before these (recurrent use), with ``key_logits`` also
        the shift they were taken with ``[batch..., kv_heads]``; or ``None``.

    Returns:
      ``(out [batch..., q_len, heads, v_dim] float32, state after these keys)``; rows that
      see no key are zeros.
    """
    batch_shape = phi_q.shape[:-3]
    q_len, heads, features = phi_q.shape[-3:]
    kv_heads = phi_k.shape[-2]
    phi_q = phi_q.reshape(*batch_shape, q_len, kv_heads, heads // kv_heads, features)
    value = value.astype(jnp.float32)
    if state is None:
        state = (
            jnp.zeros((*batch_shape, kv_heads, features, value.shape[-1]), jnp.float32),
            jnp.zeros((*batch_shape, kv_heads, features), jnp.float32),
        )
        if key_logits:
            state = (*state, jnp.zeros((*batch_shape, kv_heads), jnp.float32))
    if not is_causal:
        kv, norm, *shift = state
        if key_logits:
            phi_k, kv, norm, new = _shifted_keys(phi_k, shift[0], kv, norm, len(batch_shape))
            shift = [new]
        kv = kv + jnp.einsum("...khf,...khd->...hfd", phi_k, value, precision=precision)
        norm = norm + phi_k.sum(-3)  # [..., kv_heads, features]
        num = jnp.einsum("...qhgf,...hfd->...qhgd", phi_q, kv, precision=precision)
        den = jnp.einsum("...qhgf,...hf->...qhg", phi_q, norm, precision=precision)
        state = (kv, norm, *shift)
    else:
        num, den, state = _causal(phi_q, phi_k, value, chunk_size, precision, state, key_logits)
    out = _divide(num, den)
    return out.reshape(*batch_shape, q_len, heads, -1), state


def _causal(phi_q, phi_k, value, chunk_size, precision, state, key_logits):
    """Chunked prefix sums from ``state``: ``(numerator [..., q, h, g, d], denominator
    [..., q, h, g], final state)``."""
    *batch_shape, length = phi_q.shape[:-3]
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length

    def split(x, fill=0.0):  # [..., length, ...] -> [chunks, ..., chunk, ...]
        axis = len(batch_shape)
        widths = [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (x.ndim - axis - 1)
        x = jnp.pad(x, widths, constant_values=fill)
        x = x.reshape(*x.shape[:axis], chunks, chunk, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    k_fill = -jnp.inf if key_logits else 0.0
    q_c, k_c, v_c = split(phi_q), split(phi_k, k_fill), split(value)
    tril = jnp.tril(jnp.ones((chunk, chunk), bool))

    def step(carry, xs):
        kv, norm, *shift = carry
        q, k, v = xs
        if key_logits:
            k, kv, norm, new = _shifted_keys(k, shift[0], kv, norm, len(batch_shape))
            shift = [new]
        scores = jnp.einsum("...qhgf,...khf->...hgqk", q, k, precision=precision)
        scores = jnp.where(tril, scores, 0.0)
        num = jnp.einsum("...hgqk,...khd->...qhgd", scores, v, precision=precision)
        num = num + jnp.einsum("...qhgf,...hfd->...qhgd", q, kv, precision=precision)
        den = scores.sum(-1)  # [..., h, g, q]
        den = jnp.moveaxis(den, -1, -3) + jnp.einsum(
            "...qhgf,...hf->...qhg", q, norm, precision=precision
        )
        kv = kv + jnp.einsum("...khf,...khd->...hfd", k, v, precision=precision)
        norm = norm + k.sum(-3)
        return (kv, norm, *shift), (num, den)

    state, (num, den) = jax.lax.scan(step, tuple(state), (q_c, k_c, v_c))

    def merge(x):  # [chunks, ..., chunk, ...] -> [..., length, ...]
        axis = len(batch_shape)
        x = jnp.moveaxis(x, 0, axis)
        x = x.reshape(*x.shape[:axis], chunks * chunk, *x.shape[axis + 2 :])
        return jax.lax.slice_in_dim(x, 0, length, axis=axis)

    return merge(num), merge(den), state


def _zero_invalid(x: jax.Array, valid: jax.Array | None, extra_axes: int) -> jax.Array:
    """``x [*batch, n, ...]`` with the rows where ``valid [*batch, n]`` is False zeroed."""
    if valid is None:
        return x
    return jnp.where(valid.reshape(*valid.shape, *(1,) * extra_axes), x, 0.0)


def _hide_invalid(phi_k: jax.Array, valid: jax.Array | None, key_logits: bool) -> jax.Array:
    """Key features (or log-features, which get -inf) of the invalid keys hidden."""
    if not key_logits:
        return _zero_invalid(phi_k, valid, 2)
    if valid is None:
        return phi_k
    return jnp.where(valid.reshape(*valid.shape, 1, 1), phi_k, -jnp.inf)


def _pad_front(x: jax.Array, count: int, axis: int, fill: float = 0.0) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (count, 0)
    return jnp.pad(x, widths, constant_values=fill)


def prefix_attention(
    call: AttentionCall,
    features: Callable[[jax.Array, bool], jax.Array],
    *,
    chunk_size: int,
    key_logits: bool = False,
) -> jax.Array:
    """Feature attention on a validated call, with ``features(x, is_query) -> phi(x)``
    (for keys ``log phi(x)`` with ``key_logits``): padding from its visibility,
    bottom-right causal for any ``q_len`` / ``kv_len`` (the shorter side padded at the
    front with tokens that see, or count, nothing).

    Returns ``[*batch, q_len, heads, v_dim]`` in the call's output dtype.
    """
    q_tok, k_tok = call.visibility.tokens()
    query, key, value = call.safe_inputs()
    phi_q = features(query, True)
    phi_k = _hide_invalid(features(key, False), k_tok.valid, key_logits)
    q_len, kv_len = query.shape[-3], key.shape[-3]
    axis = len(call.batch_shape)
    offset = kv_len - q_len
    causal = call.visibility.is_causal
    if causal and offset > 0:
        phi_q = _pad_front(phi_q, offset, axis)
    elif causal and offset < 0:
        fill = -jnp.inf if key_logits else 0.0
        phi_k, value = _pad_front(phi_k, -offset, axis, fill), _pad_front(value, -offset, axis)
    out, _ = feature_attention(
        phi_q,
        phi_k,
        value,
        is_causal=causal,
        chunk_size=chunk_size,
        precision=call.precision,
        key_logits=key_logits,
    )
    out = jax.lax.slice_in_dim(out, out.shape[axis] - q_len, out.shape[axis], axis=axis)
    return _zero_invalid(out, q_tok.valid, 2).astype(call.out_dtype)


@dataclasses.dataclass(frozen=True)
class Recurrence:
    """The recurrent (decoding) form of a feature-map kernel.

    Attributes:
      features: ``(x [..., d], is_query, options) -> phi(x) [..., f]`` float32, with the
        kernel's options (``options["scale"]`` is the logit scale).
      feature_dim: ``(head_dim, options) -> f``.
      key_logits: ``features`` gives keys' ``log phi``; the state then keeps the shift
        their exponentials were taken with (``"shift" [batch, kv_heads]``).
    """

    features: Callable[[jax.Array, bool, dict[str, Any]], jax.Array]
    feature_dim: Callable[[int, dict[str, Any]], int]
    key_logits: bool = False

    def init(
        self, batch: int, kv_heads: int, head_dim: int, v_dim: int, options: dict[str, Any]
    ) -> dict[str, jax.Array]:
        """The empty state: ``{"kv": [batch, kv_heads, f, v_dim], "k": [batch, kv_heads,
        f]}`` (and ``"shift": [batch, kv_heads]`` with ``key_logits``) float32 zeros."""
        f = self.feature_dim(head_dim, options)
        state = {
            "kv": jnp.zeros((batch, kv_heads, f, v_dim), jnp.float32),
            "k": jnp.zeros((batch, kv_heads, f), jnp.float32),
        }
        if self.key_logits:
            state["shift"] = jnp.zeros((batch, kv_heads), jnp.float32)
        return state

    def step(
        self,
        state: dict[str, jax.Array],
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        valid: jax.Array | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Attends ``query [batch, n, heads, d]`` causally to every key so far plus these
        ``key`` / ``value [batch, n, kv_heads, .]`` (``valid [batch, n]``: padding that
        must not count), and folds them into the state.

        Returns ``(out [batch, n, heads, v_dim] float32, new state)``.
        """
        options = dict(options or {})
        chunk_size = options.pop("chunk_size", 64)
        if options.get("scale") is None:
            options["scale"] = float(query.shape[-1]) ** -0.5
        phi_q = self.features(query, True, options)
        phi_k = _hide_invalid(self.features(key, False, options), valid, self.key_logits)
        value = _zero_invalid(value.astype(jnp.float32), valid, 2)
        names = ("kv", "k", "shift") if self.key_logits else ("kv", "k")
        out, new = feature_attention(
            phi_q, phi_k, value, is_causal=True, chunk_size=chunk_size,
            state=tuple(state[name] for name in names), key_logits=self.key_logits,
        )  # fmt: skip
        return out, dict(zip(names, new, strict=True))
