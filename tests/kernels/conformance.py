"""The conformance cases and checks (shipped in :mod:`attn_jax.testing`), under the names
the kernel tests use, and the test-only dropout problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.testing.cases import (  # noqa: F401
    CASES,
    DTYPES,
    TOLERANCES,
    Case,
    make_inputs,
    output_shape,
    visible_rows,
)
from attn_jax.testing.checks import (  # noqa: F401
    MAX_ERRORS,
    check_against_reference,
    check_finite_kv_padding,
    check_padding_never_leaks,
    check_unsupported_raises,
    check_weights,
    value_and_grads,
)
from attn_jax.testing.checks import max_error as _max_err  # noqa: F401
from attn_jax.testing.checks import record_error as _record  # noqa: F401


def uniform_dropout_problem(
    batch: int = 4, heads: int = 4, q_len: int = 16, kv_len: int = 32
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries of zeros (uniform weights ``1/kv_len``) and one-hot values, so the output
    ``[..., q, h, j]`` equals the weight of key ``j`` after dropout."""
    q = jnp.zeros((batch, q_len, heads, 8))
    k = jnp.ones((batch, kv_len, heads, 8))
    v = jnp.broadcast_to(jnp.eye(kv_len)[:, None, :], (batch, kv_len, heads, kv_len))
    return q, k, v
