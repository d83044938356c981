"""The conformance checks catch real bugs: deliberately wrong kernels must fail them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from attn_jax import kernels
from tests.kernels import conformance as cf

CASES = {c.name: c for c in cf.CASES}


def _naive(
    query,
    key,
    value,
    mask=None,
    *,
    is_causal=False,
    fill=-1e9,
    top_left=False,
    softmax_dtype=jnp.float32,
    group=lambda h, heads, kv_heads: h // (heads // kv_heads),
):
    """A plain attention with knobs for classic bugs. Layout as the library's."""
    heads, kv_heads = query.shape[-2], key.shape[-2]
    index = jnp.array([group(h, heads, kv_heads) for h in range(heads)])
    key, value = key[..., index, :], value[..., index, :]
    logits = jnp.einsum(
        "...qhd,...khd->...hqk", query, key, preferred_element_type=jnp.float32
    ) / math.sqrt(query.shape[-1])
    q_len, kv_len = query.shape[-3], key.shape[-3]
    allowed = jnp.ones(logits.shape, bool)
    if mask is not None:
        allowed &= mask
    if is_causal:
        shift = 0 if top_left else kv_len - q_len
        allowed &= jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + shift
    logits = jnp.where(allowed, logits.astype(softmax_dtype), fill)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(value.dtype), value)
    return out.astype(query.dtype)


BUGS = {
    # flax-style top-left causal alignment breaks KV-cache decoding (q_len < kv_len).
    "top_left_causal": (dict(top_left=True), "causal_q_lt_kv", jnp.float32),
    # -inf fill: fully masked rows become NaN.
    "inf_fill": (dict(fill=-jnp.inf), "fully_masked_rows", jnp.float32),
    # Fully masked rows averaged instead of zeroed.
    "no_zero_rows": (dict(), "fully_masked_rows", jnp.float32),
    # Wrong GQA head mapping (h % kv_heads instead of h // group).
    "gqa_modulo": (dict(group=lambda h, heads, kv_heads: h % kv_heads), "gqa", jnp.float32),
    # Softmax in half precision.
    "half_softmax": (dict(softmax_dtype=jnp.float16), "sharp_softmax", jnp.float16),
}


@pytest.mark.parametrize("bug", BUGS)
def test_buggy_kernel_fails_conformance(bug):
    options, case_name, dtype = BUGS[bug]
    caps = kernels.Capabilities(mask=True, causal=True, gqa=True)

    @kernels.register(f"buggy_{bug}", capabilities=caps)
    def buggy(query, key, value, bias=None, mask=None, *, is_causal=False):
        assert bias is None
        return _naive(query, key, value, mask, is_causal=is_causal, **options)

    try:
        with pytest.raises(AssertionError):
            cf.check_against_reference(buggy, CASES[case_name], dtype, record=False)
    finally:
        kernels.unregister(f"buggy_{bug}")


def test_silently_dropped_mask_is_caught():
    @kernels.register("buggy_drops_mask", capabilities=kernels.Capabilities(mask=True))
    def drops_mask(query, key, value, bias=None, mask=None):
        return _naive(query, key, value)

    try:
        with pytest.raises(AssertionError):
            cf.check_against_reference(drops_mask, CASES["random_mask"], jnp.float32, record=False)
    finally:
        kernels.unregister("buggy_drops_mask")


def test_correct_naive_kernel_passes():
    """The same naive kernel without bugs (but for its fill of empty rows) passes."""
    caps = kernels.Capabilities(mask=True, causal=True, gqa=True)

    @kernels.register("naive_ok", capabilities=caps)
    def naive(query, key, value, bias=None, mask=None, *, is_causal=False):
        return _naive(query, key, value, mask, is_causal=is_causal)

    try:
        for name in ("causal_q_lt_kv", "gqa", "random_mask"):
            cf.check_against_reference(naive, CASES[name], jnp.float32, record=False)
        # The case that catches a float16 softmax passes with a float32 one.
        cf.check_against_reference(naive, CASES["sharp_softmax"], jnp.float16, record=False)
    finally:
        kernels.unregister("naive_ok")
