"""The conformance suite, shipped: check any attention kernel against the float64 reference.

>>> from attn_jax import testing
>>> testing.check_kernel("flash")  # or any callable with jax.nn's signature
"""

from attn_jax.testing.cases import CASES, TOLERANCES, Case, make_inputs
from attn_jax.testing.checks import (
    check_against_reference,
    check_finite_kv_padding,
    check_padding_never_leaks,
    check_unsupported_raises,
    check_weights,
)
from attn_jax.testing.suite import ConformanceCase, check_kernel, conformance_cases

__all__ = [
    "CASES",
    "TOLERANCES",
    "Case",
    "ConformanceCase",
    "check_against_reference",
    "check_finite_kv_padding",
    "check_kernel",
    "check_padding_never_leaks",
    "check_unsupported_raises",
    "check_weights",
    "conformance_cases",
    "make_inputs",
]
