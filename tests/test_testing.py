"""attn_jax.testing: the shipped conformance suite finds real bugs, names the failing check,
and runs on any callable with jax.nn's signature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attn_jax import kernels, testing


def _subset(*names: str, kind: str = "values") -> list[testing.ConformanceCase]:
    cases = testing.conformance_cases(["float32"], kinds=[kind])
    return [c for c in cases if c.case.name in names]


def test_a_registered_kernel_passes_and_reports_what_ran():
    report = testing.check_kernel("flash", cases=_subset("gqa", "padding_empty_keys"))
    assert report == {
        "passed": ["values-padding_empty_keys-float32", "values-gqa-float32"],
        "skipped": [],
    }


def test_unsupported_arguments_must_be_refused():
    # sliding_window has no dense mask: refusing it passes, accepting it would fail.
    assert testing.check_kernel("sliding_window", cases=_subset("random_mask"))["passed"]

    def drops_the_mask(q, k, v, bias=None, mask=None, **kwargs):
        return kernels.sliding_window_attention(q, k, v, **kwargs)

    with pytest.raises(AssertionError, match=r"values-random_mask-float32: .*forward error"):
        testing.check_kernel(drops_the_mask, cases=_subset("random_mask"))


def test_the_first_failing_check_is_named_with_its_error():
    def wrong_scale(q, k, v, bias=None, mask=None, **kwargs):
        return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=1.0, **kwargs)

    with pytest.raises(AssertionError, match=r"^values-no_mask-float32: .*forward error"):
        testing.check_kernel(wrong_scale, dtypes=["float32"])


def test_jax_nn_top_left_causal_alignment_and_nan_leaks_are_findings():
    with pytest.raises(AssertionError, match=r"^values-causal_q_lt_kv-float32: "):
        testing.check_kernel(jax.nn.dot_product_attention, dtypes=["float32"])
    with pytest.raises(AssertionError, match=r"padding_empty_keys.*NaN/inf reached the output"):
        testing.check_kernel(jax.nn.dot_product_attention, cases=_subset(
            "padding_empty_keys", kind="padding"))  # fmt: skip
    # What its signature cannot express (segments, positions) is skipped, not failed.
    report = testing.check_kernel(
        jax.nn.dot_product_attention, cases=_subset("gqa", "segments_cross", "mqa")
    )
    assert report["passed"] == ["values-gqa-float32", "values-mqa-float32"]
    assert report["skipped"] == [
        "values-segments_cross-float32: the signature lacks "
        "['key_value_segment_ids', 'query_segment_ids']"
    ]


def test_crashes_and_strict_modes_are_checks_too():
    def rank_sloppy(q, k, v, bias=None, mask=None, **kwargs):
        scale = jnp.ones(q.shape[-1:])  # [d] against [..., heads, d]: implicit rank promotion
        return jax.nn.dot_product_attention(q * scale, k, v, bias, mask, **kwargs)

    strict = testing.conformance_cases(["float32"], kinds=["strict"])
    with pytest.raises(
        AssertionError, match=r"rank_promotion_raise: ValueError: .*jax_numpy_rank_promotion"
    ):
        testing.check_kernel(rank_sloppy, cases=[c for c in strict if c.mode != "x64"])


def test_conformance_cases_for_parametrisation():
    cases = testing.conformance_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert {c.kind for c in cases} == {"values", "strict", "padding", "vmap"}
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    assert any(c.decoding for c in cases)
    assert not any(c.decoding for c in testing.conformance_cases(decode=False))
    with pytest.raises(ValueError, match="dtypes"):
        testing.conformance_cases(["int8"])
    with pytest.raises(ValueError, match="kinds"):
        testing.conformance_cases(kinds=["speed"])
    with pytest.raises(TypeError, match="fn_or_name"):
        testing.check_kernel(3)
