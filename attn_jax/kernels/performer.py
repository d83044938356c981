"""Performer attention (Choromanski et al. 2021): FAVOR+, positive orthogonal random
features whose inner products estimate ``exp(q . k * scale)`` without bias, so the output
approaches exact softmax attention as the number of features grows. O(N) time and memory.

The random projection comes only from the explicit ``rng`` key (same key, same features) or
is passed in drawn (``projection=``: what models keep in their parameters).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import checks
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.feature_maps import Recurrence, prefix_attention
from attn_jax.kernels.registry import Capabilities, register

__all__ = [
    "PERFORMER_RECURRENCE",
    "orthogonal_features",
    "performer_attention",
    "positive_features",
]


def _orthonormal_rows(matrices: jax.Array) -> jax.Array:
    """Rows of ``[blocks, dim, dim]`` full-rank matrices made orthonormal by Gram-Schmidt,
    each projection done twice ("twice is enough": orthogonal to float rounding).

    Plain matmuls rather than ``jnp.linalg.qr``: on CPU that is a LAPACK custom call, and a
    jitted Transformer calling it wedged XLA's thread pool on a later execution (no CPU use,
    never returns; jax 0.10.2, 2-core host).
    """
    dim = matrices.shape[-1]
    project = lambda basis, row: jnp.einsum(
        "bj,bjd->bd",
        jnp.einsum("bjd,bd->bj", basis, row, precision="highest"),
        basis,
        precision="highest",
    )

    def orthonormalise(i, rows):
        earlier = jnp.where((jnp.arange(dim) < i)[:, None], rows, 0.0)
        row = rows[:, i]
        row = row - project(earlier, row)
        row = row - project(earlier, row)
        return rows.at[:, i].set(row / jnp.linalg.norm(row, axis=-1, keepdims=True))

    return jax.lax.fori_loop(0, dim, orthonormalise, matrices)


def orthogonal_features(rng: jax.Array, num_features: int, dim: int) -> jax.Array:
    """``[num_features, dim]`` Gaussian-like projections, orthogonal within each block of
    ``dim`` rows, rows rescaled to chi-distributed norms (FAVOR+'s ORF)."""
    blocks = -(-num_features // dim)
    block_rng, norm_rng = jax.random.split(rng)
    gaussian = jax.random.normal(block_rng, (blocks, dim, dim), jnp.float32)
    rows = _orthonormal_rows(gaussian).reshape(blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_rng, (num_features, dim)), axis=-1)
    return rows * norms[:, None]


def positive_features(
    x: jax.Array, projection: jax.Array, *, is_query: bool, precision: Any = None
) -> jax.Array:
    """FAVOR+ features ``exp(w_m . x - |x|^2 / 2) / sqrt(m)`` of ``x [..., dim]`` (already
    scaled by ``scale ** 0.5``), for queries divided by their own row maximum (which
    cancels in the attention ratio); for keys their logarithm, which
    :func:`~attn_jax.kernels.feature_maps.prefix_attention` and :class:`Recurrence`
    exponentiate with one stabilising shift per sequence and head (``key_logits=True``).
    ``precision``: of the projection's matmul (``jax.lax.Precision``).

    No per-feature shift is applied: both factors of a feature's product stay near 1 for
    keys and queries of moderate norm at any head_dim. (Shifting keys by ``|w_m|^2 / 2``
    to bound them without looking at the data, and queries back, put keys near
    ``exp(-dim / 2)``, which underflows float32 to 0 from head_dim ~200 on: every output 0.)
    """
    x = x.astype(jnp.float32)
    logits = jnp.einsum("...d,md->...m", x, projection, precision=precision) - 0.5 * jnp.sum(
        x * x, axis=-1, keepdims=True
    )
    if not is_query:
        return logits - 0.5 * math.log(projection.shape[0])
    logits = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    return jnp.exp(logits) / math.sqrt(projection.shape[0])


def _projection(options: dict[str, Any], dim: int) -> jax.Array:
    projection, rng = options.get("projection"), options.get("rng")
    num_features = options.get("num_features", 256)
    if (projection is None) == (rng is None):
        raise checks.AttentionInputError(
            "argument 'rng': pass exactly one of 'rng' (a jax.random key drawing the "
            "features) and 'projection' (features already drawn)"
        )
    if projection is not None:
        projection = jnp.asarray(projection, jnp.float32)
        if projection.ndim != 2 or projection.shape[1] != dim:
            checks.fail("projection", f"expected [num_features, {dim}], got {projection.shape}")
        return projection
    if not isinstance(num_features, int) or num_features < 1:
        checks.fail("num_features", f"must be an integer >= 1, got {num_features!r}")
    return orthogonal_features(rng, num_features, dim)


def _features(x: jax.Array, is_query: bool, options: dict[str, Any]) -> jax.Array:
    root = math.sqrt(options["scale"])
    projection = _projection(options, x.shape[-1])
    precision = options.get("precision")
    return positive_features(x * root, projection, is_query=is_query, precision=precision)


def _feature_dim(head_dim: int, options: dict[str, Any]) -> int:
    if options.get("projection") is not None:
        return int(jnp.shape(options["projection"])[0])
    return int(options.get("num_features", 256))


PERFORMER_RECURRENCE = Recurrence(_features, _feature_dim, key_logits=True)


@register(
    "performer",
    capabilities=Capabilities(
        causal=True, seq_lengths=True, gqa=True, exact=False, decode="recurrent"
    ),
    recurrent=PERFORMER_RECURRENCE,
)
def performer_attention(
    call: AttentionCall,
    *,
    rng: jax.Array | None = None,
    projection: jax.Array | None = None,
    num_features: int = 256,
    chunk_size: int = 64,
) -> AttentionOutput:
    """Softmax attention estimated with ``num_features`` positive orthogonal random
    features (FAVOR+). Causal is bottom-right (any ``q_len`` / ``kv_len``); masks, biases,
    windows, segments, explicit positions and dropout raise ``ValueError`` (no
    random-feature form).

    Options:
      rng: ``jax.random`` key drawing the projection (redraw it to resample), or
      projection: the drawn ``[num_features, head_dim]`` projection itself
        (:func:`orthogonal_features`), e.g. a model's fixed features.
      num_features: random features ``m`` (with ``rng``); the variance shrinks as ``1/m``.
      chunk_size: causal chunk length.
    """
    options = {"rng": rng, "projection": projection, "num_features": num_features}
    options["scale"], options["precision"] = call.scale, call.precision
    options["projection"] = _projection(options, call.query.shape[-1])  # drawn once
    options["rng"] = None
    features = lambda x, is_query: _features(x, is_query, options)
    return AttentionOutput(prefix_attention(call, features, chunk_size=chunk_size, key_logits=True))
