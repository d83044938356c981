"""Float64 NumPy reference implementations with hand-derived gradients (tests and docs only).

Written for clarity, not speed, and independent of the kernels: masks are built straight
from their definitions, key/value heads are repeated explicitly for GQA, the softmax skips
masked entries instead of filling them, and gradients come from the textbook backward
formulas rather than autodiff. Every function takes arrays of any float dtype (they are
upcast to float64) and an optional output cotangent ``d_out``; with it, it also returns the
gradients of ``sum(output * d_out)``.

Softmax attention backward, per head (``P`` = weights, ``S`` = logits)::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),   dBias = dS
    dot product:   dQ = scale dS K,   dK = scale dS^T Q
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "additive_attention",
    "attention_pooling",
    "dot_product_attention",
    "full_mask",
    "multiplicative_attention",
    "softmax_attention",
]


def f64(x: Any) -> np.ndarray | None:
    """Any array (jax, numpy, bfloat16, ...) -> float64 NumPy array; ``None`` stays."""
    return None if x is None else np.asarray(x).astype(np.float64)


def full_mask(
    batch_shape: Sequence[int],
    heads: int,
    q_len: int,
    kv_len: int,
    *,
    mask: Any = None,
    is_causal: bool = False,
    local_window_size: int | Sequence[int] | None = None,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    query_segment_ids: Any = None,
    key_value_segment_ids: Any = None,
    query_positions: Any = None,
    key_value_positions: Any = None,
    causal_alignment: str = "bottom_right",
) -> np.ndarray:
    """Boolean ``[batch..., heads, q_len, kv_len]``: which key each query may attend to.

    Straight from the definitions, in NumPy: query ``i`` sits at position
    ``query_positions[..., i]`` (default ``i + kv_len - q_len``, or ``i`` top-left), key
    ``j`` at ``key_value_positions[..., j]`` (default ``j``).
    """
    batch_shape = tuple(batch_shape)
    shape = (*batch_shape, heads, q_len, kv_len)
    allowed = np.ones(shape, bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, bool), shape)
    offset = kv_len - q_len if causal_alignment == "bottom_right" else 0
    q_pos = np.broadcast_to(
        np.arange(q_len) + offset if query_positions is None else np.asarray(query_positions),
        (*batch_shape, q_len),
    )
    k_pos = np.broadcast_to(
        np.arange(kv_len) if key_value_positions is None else np.asarray(key_value_positions),
        (*batch_shape, kv_len),
    )
    if query_segment_ids is not None and key_value_segment_ids is None:
        key_value_segment_ids = query_segment_ids
    if local_window_size is not None:
        if isinstance(local_window_size, int | np.integer):
            left = right = int(local_window_size)
        else:
            left, right = local_window_size
    q_lens = None if query_seq_lengths is None else np.broadcast_to(query_seq_lengths, batch_shape)
    kv_lens = (
        None
        if key_value_seq_lengths is None
        else np.broadcast_to(key_value_seq_lengths, batch_shape)
    )
    q_seg = (
        None
        if query_segment_ids is None
        else np.broadcast_to(query_segment_ids, (*batch_shape, q_len))
    )
    k_seg = (
        None
        if key_value_segment_ids is None
        else np.broadcast_to(key_value_segment_ids, (*batch_shape, kv_len))
    )
    p = q_pos[..., None, :, None]  # [batch..., 1 (heads), q_len, 1]
    r = k_pos[..., None, None, :]  # [batch..., 1, 1, kv_len]
    if is_causal:
        allowed &= r <= p
    if local_window_size is not None:
        allowed &= (r >= p - left) & (r <= p + right)
    if q_lens is not None:
        allowed &= (np.arange(q_len) < q_lens[..., None])[..., None, :, None]
    if kv_lens is not None:
        allowed &= (np.arange(kv_len) < kv_lens[..., None])[..., None, None, :]
    if q_seg is not None:
        allowed &= q_seg[..., None, :, None] == k_seg[..., None, None, :]
    return allowed


def _repeat_kv(x: np.ndarray, heads: int) -> np.ndarray:
    """``[..., kv_len, kv_heads, d]`` -> ``[..., kv_len, heads, d]``: head h uses h // G."""
    return np.repeat(x, heads // x.shape[-2], axis=-2)


def _sum_groups(grad: np.ndarray, kv_heads: int) -> np.ndarray:
    """Inverse of :func:`_repeat_kv` for gradients: sum the query heads of each group."""
    *lead, heads, d = grad.shape
    return grad.reshape(*lead, kv_heads, heads // kv_heads, d).sum(-2)


def _unbroadcast(grad: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sums ``grad`` down to ``shape`` (the shape of a broadcast input)."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis, keepdims=True)
    return grad


def softmax_attention(
    logits: np.ndarray,
    value: np.ndarray,
    allowed: np.ndarray,
    d_out: np.ndarray | None = None,
    *,
    sinks: np.ndarray | None = None,
    dropout: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Softmax over visible keys and the weighted sum of values, with its backward.

    Args:
      logits: ``[batch..., heads, q_len, kv_len]`` (bias already added).
      value: ``[batch..., kv_len, kv_heads, v_dim]``.
      allowed: boolean, same shape as ``logits``.
      d_out: ``[batch..., q_len, heads, v_dim]`` output cotangent.
      sinks: ``[heads]`` sink logits: ``exp(sink)`` joins every row's denominator.
      dropout: factors (``keep / (1 - rate)``) on the weights that reach the values.

    Returns:
      ``out``, ``weights`` (before dropout), ``lse`` (``[batch..., q_len, heads]``,
      ``-inf`` for empty rows without a sink), and with ``d_out``: ``d_logits``,
      ``d_value`` and, with ``sinks``, ``d_sinks``.
    """
    heads, kv_heads = logits.shape[-3], value.shape[-2]
    visible_logits = np.where(allowed, logits, -np.inf)
    any_visible = allowed.any(-1, keepdims=True)
    row_max = np.where(any_visible, visible_logits.max(-1, keepdims=True, initial=-np.inf), 0.0)
    sink = None
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], row_max.shape)
        row_max = np.where(any_visible, np.maximum(row_max, sink), sink)
        any_visible = np.ones_like(any_visible)
    exp = np.where(allowed, np.exp(np.where(allowed, logits - row_max, 0.0)), 0.0)
    total = exp.sum(-1, keepdims=True)
    if sink is not None:
        total = total + np.exp(sink - row_max)
    weights = exp / np.where(any_visible, total, 1.0)
    with np.errstate(divide="ignore"):
        lse = np.where(any_visible, row_max + np.log(np.where(any_visible, total, 1.0)), -np.inf)
    values = _repeat_kv(value, heads)  # [batch..., kv_len, heads, v_dim]
    applied = weights if dropout is None else weights * dropout
    out = np.einsum("...hqk,...khd->...qhd", applied, values)
    result = {"out": out, "weights": weights, "lse": np.moveaxis(lse[..., 0], -2, -1)}
    if d_out is not None:
        d_weights = np.einsum("...qhd,...khd->...hqk", d_out, values)
        if dropout is not None:
            d_weights = d_weights * dropout
        d_logits = weights * (d_weights - (d_weights * weights).sum(-1, keepdims=True))
        d_values = np.einsum("...hqk,...qhd->...khd", applied, d_out)
        result.update(d_logits=d_logits, d_value=_sum_groups(d_values, kv_heads))
        if sink is not None:
            p_sink = np.exp(sink - lse)[..., 0]  # [batch..., heads, q_len]
            row = (d_weights * weights).sum(-1)  # d_out . out
            d_sinks = -(p_sink * row)
            result["d_sinks"] = d_sinks.reshape(-1, heads, d_sinks.shape[-1]).sum((0, 2))
    return result


def _allowed(query_shape, kv_len, mask_kwargs) -> np.ndarray:
    *batch, q_len, heads, _ = query_shape
    return full_mask(batch, heads, q_len, kv_len, **mask_kwargs)


def _outputs(res: dict[str, np.ndarray], return_weights: bool, return_residual: bool):
    extras = [res["weights"]] if return_weights else []
    if return_residual:
        extras.append(res["lse"])
    return (res["out"], *extras) if extras else res["out"]


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    d_out=None,
    return_weights=False,
    return_residual=False,
    return_attention_mass=False,
    score_fn=None,
    mask_fn=None,
    logits_soft_cap=None,
    sinks=None,
    dropout_factors=None,
    **mask_kwargs,
):
    """Reference for :func:`attn_jax.kernels.dot_product_attention`.

    ``score_fn`` and ``mask_fn`` are evaluated in float64 (under ``jax.
    enable_x64(True)``) on the dense index grids; ``dropout_factors`` (``keep / (1 - rate)``,
    ``[batch..., heads, q_len, kv_len]``) is a given dropout realisation.

    Returns the outputs as the kernel does; with ``d_out``, returns ``(outputs, grads)``
    where ``grads`` is a dict with ``query``, ``key``, ``value``, ``bias`` (if given),
    ``sinks`` (if given) and ``scores``: the gradient with respect to ``score_fn``'s output
    (the logits before the soft cap), from which that of its parameters follows.
    """
    q, k, v, b = f64(query), f64(key), f64(value), f64(bias)
    heads = q.shape[-2]
    *batch_shape, q_len, _, _ = q.shape
    kv_len = k.shape[-3]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keys = _repeat_kv(k, heads)
    logits = np.einsum("...qhd,...khd->...hqk", q, keys) * scale
    if b is not None:
        logits = logits + b
    allowed = _allowed(q.shape, kv_len, {"mask": mask, **mask_kwargs})
    grid = _index_grid(batch_shape, heads, q_len, kv_len, mask_kwargs)
    d_score_fn = None
    if score_fn is not None:
        logits, d_score_fn = _score_fn_f64(score_fn, logits, grid)
    d_cap = np.ones_like(logits)
    if logits_soft_cap is not None:
        capped = logits_soft_cap * np.tanh(logits / logits_soft_cap)
        d_cap = 1.0 - np.tanh(logits / logits_soft_cap) ** 2
        logits = capped
    if mask_fn is not None:
        allowed = allowed & np.broadcast_to(_jax_f64(mask_fn, *grid).astype(bool), allowed.shape)
    res = softmax_attention(
        logits, v, allowed, f64(d_out), sinks=f64(sinks), dropout=f64(dropout_factors)
    )
    outputs = _outputs(res, return_weights, return_residual)
    if return_attention_mass:
        mass = res["weights"].sum(-2)
        outputs = (*outputs, mass) if isinstance(outputs, tuple) else (outputs, mass)
    if d_out is None:
        return outputs
    d_scores = res["d_logits"] * d_cap  # gradient at score_fn's output
    ds = d_scores if d_score_fn is None else d_score_fn(d_scores)
    grads = {
        "query": scale * np.einsum("...hqk,...khd->...qhd", ds, keys),
        "key": _sum_groups(scale * np.einsum("...hqk,...qhd->...khd", ds, q), k.shape[-2]),
        "value": res["d_value"],
        "bias": None if b is None else _unbroadcast(ds, b.shape),
        "scores": d_scores,
    }
    if sinks is not None:
        grads["sinks"] = res["d_sinks"]
    return outputs, grads


def _index_grid(batch_shape, heads, q_len, kv_len, mask_kwargs) -> tuple[np.ndarray, ...]:
    """``(batch, head, q_pos, kv_pos)`` int arrays broadcasting to ``[batch..., heads, q_len,
    kv_len]``: flattened batch index, head, and the positions of the visibility model."""
    batch_shape = tuple(batch_shape)
    offset = kv_len - q_len if mask_kwargs.get("causal_alignment") != "top_left" else 0
    q_pos = mask_kwargs.get("query_positions")
    k_pos = mask_kwargs.get("key_value_positions")
    q_pos = np.arange(q_len) + offset if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(kv_len) if k_pos is None else np.asarray(k_pos)
    q_pos = np.broadcast_to(q_pos, (*batch_shape, q_len))[..., None, :, None]
    k_pos = np.broadcast_to(k_pos, (*batch_shape, kv_len))[..., None, None, :]
    batch = np.arange(int(np.prod(batch_shape))).reshape(*batch_shape, 1, 1, 1)
    head = np.arange(heads).reshape(*(1,) * len(batch_shape), heads, 1, 1)
    return batch, head, q_pos.astype(np.int64), k_pos.astype(np.int64)


def _jax_f64(fn, *args):
    """``fn(*args)`` (a jnp function) evaluated in float64, as a NumPy array."""
    import jax.numpy as jnp
    from jax import enable_x64

    with enable_x64(True):
        return np.asarray(fn(*(jnp.asarray(a) for a in args)))


def _score_fn_f64(score_fn, logits: np.ndarray, grid):
    """``score_fn(logits, *grid)`` in float64, and the map of a gradient at its output to
    the gradient at its input ``logits`` (its vector-Jacobian product)."""
    import jax
    import jax.numpy as jnp
    from jax import enable_x64

    with enable_x64(True):
        args = [jnp.asarray(a) for a in grid]
        modify = lambda s: jnp.broadcast_to(score_fn(s, *args), s.shape)
        out, vjp = jax.vjp(modify, jnp.asarray(logits))
        out = np.asarray(out, np.float64)

    def backward(g: np.ndarray) -> np.ndarray:
        with enable_x64(True):
            return np.asarray(vjp(jnp.asarray(g))[0], np.float64)

    return out, backward


def additive_attention(
    query,
    key,
    value,
    v,
    bias=None,
    mask=None,
    *,
    d_out=None,
    return_weights=False,
    return_residual=False,
    **mask_kwargs,
):
    """Reference for :func:`attn_jax.kernels.additive_attention`; grads include ``v``."""
    q, k, val, vv, b = f64(query), f64(key), f64(value), f64(v), f64(bias)
    heads, units = q.shape[-2:]
    keys = _repeat_kv(k, heads)
    v_full = np.broadcast_to(vv, (heads, units))
    hidden = np.tanh(q[..., :, None, :, :] + keys[..., None, :, :, :])  # [..., q, k, h, u]
    logits = np.einsum("...qkhu,hu->...hqk", hidden, v_full)
    if b is not None:
        logits = logits + b
    allowed = _allowed(q.shape, k.shape[-3], {"mask": mask, **mask_kwargs})
    res = softmax_attention(logits, val, allowed, f64(d_out))
    outputs = _outputs(res, return_weights, return_residual)
    if d_out is None:
        return outputs
    ds = res["d_logits"]
    d_pre = np.einsum("...hqk,hu->...qkhu", ds, v_full) * (1.0 - hidden**2)
    d_v = np.einsum("...hqk,...qkhu->...hu", ds, hidden)
    grads = {
        "query": d_pre.sum(-3),
        "key": _sum_groups(d_pre.sum(-4), k.shape[-2]),
        "value": res["d_value"],
        "v": _unbroadcast(d_v, vv.shape),
        "bias": None if b is None else _unbroadcast(ds, b.shape),
    }
    return outputs, grads


def multiplicative_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    score="dot",
    weight=None,
    scale=1.0,
    d_out=None,
    return_weights=False,
    return_residual=False,
    **mask_kwargs,
):
    """Reference for :func:`attn_jax.kernels.multiplicative_attention`; grads include
    ``weight`` for ``score="general"``."""
    q, w = f64(query), f64(weight)
    heads = q.shape[-2]
    if score == "general":
        w_full = np.broadcast_to(w, (heads, *w.shape[-2:]))
        projected = np.einsum("...qhd,hde->...qhe", q, w_full)
    else:
        projected = q
    result = dot_product_attention(
        projected,
        key,
        value,
        bias,
        mask,
        scale=scale,
        d_out=d_out,
        return_weights=return_weights,
        return_residual=return_residual,
        **mask_kwargs,
    )
    if d_out is None:
        return result
    outputs, grads = result
    if score == "general":
        d_proj = grads["query"]
        grads["query"] = np.einsum("...qhe,hde->...qhd", d_proj, w_full)
        grads["weight"] = _unbroadcast(np.einsum("...qhd,...qhe->...hde", q, d_proj), w.shape)
    return outputs, grads


def attention_pooling(
    value,
    *,
    query=None,
    key=None,
    scores=None,
    mask=None,
    lengths=None,
    scale=None,
    d_out=None,
    return_weights=False,
):
    """Reference for :func:`attn_jax.kernels.attention_pooling`; grads for ``value``,
    ``query``/``key`` or ``scores``."""
    val = f64(value)
    batch, length = val.shape[:-3], val.shape[-3]
    valid = np.ones((*batch, length), bool)
    if mask is not None:
        valid &= np.asarray(mask, bool)
    if lengths is not None:
        valid &= np.arange(length) < np.asarray(lengths)[..., None]
    d_out64 = None if d_out is None else f64(d_out)[..., None, :, :]  # add q_len = 1
    if scores is not None:
        s = f64(scores)
        heads = s.shape[-1]
        logits = np.moveaxis(s, -1, -2)[..., None, :]  # [batch..., heads, 1, length]
        allowed = np.broadcast_to(valid[..., None, None, :], logits.shape)
        res = softmax_attention(logits, val, allowed, d_out64)
        grads = (
            None
            if d_out is None
            else {
                "value": res["d_value"],
                "scores": np.moveaxis(res["d_logits"][..., 0, :], -2, -1),
            }
        )
    else:
        q = f64(query)
        heads, dim = q.shape[-2:]
        queries = np.broadcast_to(q, (*batch, heads, dim))[..., None, :, :]
        keyed = val if key is None else f64(key)
        allowed = np.broadcast_to(valid[..., None, None, :], (*batch, heads, 1, length))
        out = dot_product_attention(
            queries, keyed, val, mask=allowed, scale=scale, d_out=d_out64, return_weights=True
        )
        (o, w), g = out if d_out is not None else (out, None)
        res = {"out": o, "weights": w}
        grads = None
        if g is not None:
            grads = {"query": _unbroadcast(g["query"][..., 0, :, :], q.shape)}
            if key is None:
                grads["value"] = g["value"] + g["key"]
            else:
                grads["value"], grads["key"] = g["value"], g["key"]
    out, weights = res["out"][..., 0, :, :], res["weights"][..., 0, :]
    outputs = (out, weights) if return_weights else out
    return outputs if d_out is None else (outputs, grads)
