"""The conformance cases: attention problems (masks, bias, causal and windowed visibility,
padding, fully masked rows, GQA / MQA, unequal lengths, batch shapes, segments, decoding
positions) and their inputs, checked against the float64 reference in
:mod:`attn_jax.kernels.reference`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from attn_jax.kernels import reference as ref

# Tolerances against float64: dtype -> (forward atol, gradient atol).
TOLERANCES = {
    jnp.float32: (1e-5, 1e-4),
    jnp.bfloat16: (2e-2, 5e-2),
    jnp.float16: (5e-3, 1e-2),
}
DTYPES = list(TOLERANCES)


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. ``mask`` is a kind: None, "random", "rows" (some rows empty),
    "columns" (some keys hidden from every query, and some rows empty)."""

    name: str
    batch: tuple[int, ...] = (2,)
    q_len: int = 6
    kv_len: int = 6
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    v_dim: int | None = None
    mask: str | None = None
    mask_heads: bool = True  # mask carries a heads axis (else broadcast over heads)
    bias: str | None = None  # None, "full", "broadcast" ([heads, q, kv])
    is_causal: bool = False
    window: Any = None
    q_lengths: tuple[int, ...] | None = None
    kv_lengths: tuple[int, ...] | None = None
    segments: str | None = None  # None, "packed" (q_len == kv_len), "cross"
    positions: bool = False  # explicit query positions: the last q_len of each kv length
    alignment: str = "bottom_right"
    q_scale: float = 1.0  # > 1 sharpens the softmax (large logits)

    def needs(self) -> set[str]:
        """Capabilities this case exercises."""
        need = set()
        if self.mask:
            need.add("mask")
        if self.bias:
            need.add("bias")
        if self.is_causal:
            need.add("causal")
        if self.window is not None:
            need.add("window")
        if self.q_lengths is not None or self.kv_lengths is not None:
            need.add("seq_lengths")
        if self.heads != self.kv_heads:
            need.add("gqa")
        if self.segments:
            need.add("segments")
        if self.positions or (self.alignment != "bottom_right" and self.q_len != self.kv_len):
            need.add("positions")
        return need


CASES = [
    Case("no_mask"),
    Case("random_mask", mask="random"),
    Case("random_mask_broadcast_heads", mask="random", mask_heads=False, heads=3, kv_heads=3),
    Case("causal_square", is_causal=True),
    Case("causal_q_lt_kv", q_len=3, kv_len=7, is_causal=True),
    Case("causal_q_gt_kv", q_len=7, kv_len=4, is_causal=True),
    Case("padding_lengths", q_lengths=(4, 6), kv_lengths=(3, 6)),
    Case("padding_empty_keys", q_lengths=(6, 2), kv_lengths=(0, 5)),
    Case("window", q_len=8, kv_len=8, window=(2, 1)),
    Case("window_int", q_len=8, kv_len=8, window=1),
    Case("window_causal_q_lt_kv", q_len=4, kv_len=9, window=(3, 0), is_causal=True),
    Case("fully_masked_rows", mask="rows"),
    Case("bias", bias="full"),
    Case("bias_and_mask", bias="full", mask="random"),
    Case("bias_broadcast_and_causal", bias="broadcast", is_causal=True),
    Case("cross_q_gt_kv", q_len=9, kv_len=4),
    Case("cross_q_lt_kv", q_len=2, kv_len=11, mask="random"),
    Case("gqa", heads=4, kv_heads=2, is_causal=True),
    Case("mqa", heads=4, kv_heads=1, mask="random"),
    Case("value_head_dim", v_dim=5, is_causal=True),
    Case("extra_batch_dims", batch=(2, 3), mask="random", mask_heads=False),
    Case("no_batch_dims", batch=(), bias="full"),
    Case("single_query", q_len=1, kv_len=7, is_causal=True),
    Case("sharp_softmax", q_scale=8.0, kv_len=16, mask="random"),
    Case("segments_packed_causal", q_len=8, kv_len=8, segments="packed", is_causal=True),
    Case("segments_cross", q_len=5, kv_len=9, segments="cross"),
    Case(
        "segments_window_lengths",
        q_len=8,
        kv_len=8,
        segments="packed",
        window=(2, 0),
        kv_lengths=(8, 6),
    ),
    Case(
        "decode_positions_window",
        q_len=2,
        kv_len=9,
        positions=True,
        is_causal=True,
        window=(3, 0),
        kv_lengths=(6, 9),
        heads=4,
        kv_heads=2,
    ),
    Case("top_left_causal_q_lt_kv", q_len=3, kv_len=7, is_causal=True, alignment="top_left"),
    Case("top_left_causal_q_gt_kv", q_len=7, kv_len=4, is_causal=True, alignment="top_left"),
    Case("masked_columns", mask="columns", kv_len=9),
]


def make_inputs(case: Case, dtype: Any, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
    """``((query, key, value, bias), kwargs)`` for ``case`` in ``dtype`` (mask in kwargs)."""
    rng = np.random.RandomState(seed)
    v_dim = case.v_dim or case.head_dim
    q = case.q_scale * rng.randn(*case.batch, case.q_len, case.heads, case.head_dim)
    k = rng.randn(*case.batch, case.kv_len, case.kv_heads, case.head_dim)
    v = rng.randn(*case.batch, case.kv_len, case.kv_heads, v_dim)
    bias = None
    if case.bias == "full":
        bias = 0.5 * rng.randn(*case.batch, case.heads, case.q_len, case.kv_len)
    elif case.bias == "broadcast":
        bias = 0.5 * rng.randn(case.heads, case.q_len, case.kv_len)
    kwargs: dict[str, Any] = {}
    mask_heads = case.heads if case.mask_heads else 1
    mask_shape = (*case.batch, mask_heads, case.q_len, case.kv_len)
    if case.mask == "random":
        kwargs["mask"] = jnp.asarray(rng.rand(*mask_shape) < 0.7)
    elif case.mask == "rows":
        mask = rng.rand(*mask_shape) < 0.7
        mask[..., ::2, :] = False  # every other query row sees nothing
        kwargs["mask"] = jnp.asarray(mask)
    elif case.mask == "columns":
        mask = rng.rand(*mask_shape) < 0.8
        mask[..., ::3] = False  # every third key is seen by no query
        mask[..., ::4, :] = False
        kwargs["mask"] = jnp.asarray(mask)
    if case.is_causal:
        kwargs["is_causal"] = True
    if case.window is not None:
        kwargs["local_window_size"] = case.window
    # Integer arrays in jax's default integer dtype: int64 under jax_enable_x64.
    if case.q_lengths is not None:
        kwargs["query_seq_lengths"] = jnp.asarray(np.asarray(case.q_lengths))
    if case.kv_lengths is not None:
        kwargs["key_value_seq_lengths"] = jnp.asarray(np.asarray(case.kv_lengths))
    if case.segments is not None:
        # Sorted ids (packed sequences), unaligned between queries and keys for "cross".
        q_seg = np.sort(rng.randint(0, 3, size=(*case.batch, case.q_len)), axis=-1)
        kwargs["query_segment_ids"] = jnp.asarray(q_seg)
        if case.segments == "cross":
            kv_seg = np.sort(rng.randint(0, 3, size=(*case.batch, case.kv_len)), axis=-1)
            kwargs["key_value_segment_ids"] = jnp.asarray(kv_seg)
    if case.positions:  # a KV cache: queries are the last q_len tokens of each sequence
        lengths = np.broadcast_to(case.kv_lengths or case.kv_len, case.batch)
        positions = np.asarray(lengths)[..., None] - case.q_len + np.arange(case.q_len)
        kwargs["query_positions"] = jnp.asarray(positions)
    if case.alignment != "bottom_right":
        kwargs["causal_alignment"] = case.alignment
    arrays = tuple(None if x is None else jnp.asarray(x, dtype) for x in (q, k, v, bias))
    return arrays, kwargs


def visible_rows(case: Case, kwargs: dict[str, Any]) -> np.ndarray:
    """``[batch..., heads, q_len]`` boolean: rows with at least one visible key."""
    allowed = ref.full_mask(case.batch, case.heads, case.q_len, case.kv_len, **kwargs)
    return allowed.any(-1)


def output_shape(case: Case) -> tuple[int, ...]:
    return (*case.batch, case.q_len, case.heads, case.v_dim or case.head_dim)
