"""Every registered dot_product kernel under jax.vmap, with GQA and several blocks or
chunks: over a leading batch axis (the kernel then sees no batch dimension; values and
per-example gradients) and over a head-group axis, equal to the kernel's own batch and
heads.

jaxlib 0.10.2's XLA:CPU crashed (a segmentation fault in its "ynn" reduce fusion) on the
chunked kernel's combination of key-chunk summaries under vmap, a product summed over a
middle axis of a rank-7 array with a size-1 dimension; the kernel now adds the chunks'
summaries one by one (see attn_jax/kernels/chunked.py). These tests would die with the
process if such an operation came back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels

NAMES = kernels.available(interface="dot_product")
# Block, chunk and tile sizes that split the 64 positions into 2 pieces or more (the
# shapes of the crash: [2, 64, 4, 32] queries, 2 key/value heads, two key chunks).
SMALL_BLOCKS = {
    "chunked": {"query_chunk_size": 32, "key_chunk_size": 32},
    "flash": {"block_q": 32, "block_k": 32},
    "pallas_flash": {"block_q": 32, "block_k": 32},
    "ring": {"num_devices": 2, "block_q": 16, "block_k": 16},
    "sliding_window": {"block_size": 16, "local_window_size": (20, 0)},
    "linear": {"chunk_size": 16},
    "performer": {"chunk_size": 16, "rng": jax.random.key(7)},
}
LENGTH, HEADS, KV_HEADS, DIM = 64, 4, 2, 32


def _inputs(batch: int):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, LENGTH, HEADS, DIM))
    k = jax.random.normal(keys[1], (batch, LENGTH, KV_HEADS, DIM))
    v = jax.random.normal(keys[2], (batch, LENGTH, KV_HEADS, DIM))
    return q, k, v


def _kernel(name: str, **fixed):
    options = {**SMALL_BLOCKS.get(name, {}), **fixed}
    kernel = kernels.get(name)
    return lambda q, k, v: kernel(q, k, v, **options)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_a_leading_batch_axis_equals_the_kernels_own_batch(name):
    q, k, v = _inputs(batch=2)
    fn = _kernel(name)
    expected = jax.jit(fn)(q, k, v)
    vmapped = jax.jit(jax.vmap(fn))(q, k, v)  # each call: [length, heads, dim], no batch
    np.testing.assert_allclose(vmapped, expected, rtol=1e-5, atol=1e-5)
    # Per-example gradients: vmap over grad equals the gradient of the summed loss.
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
    per_example = jax.jit(jax.vmap(grad))(q, k, v)
    for got, want in zip(per_example, jax.jit(grad)(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_head_groups_equals_the_kernels_own_heads(name):
    causal = kernels.capabilities(name).causal
    q, k, v = _inputs(batch=1)
    fn = _kernel(name, is_causal=True) if causal else _kernel(name)
    expected = jax.jit(fn)(q, k, v)
    groups = HEADS // KV_HEADS  # query heads h = g * groups + i read kv head g
    q_groups = q.reshape(1, LENGTH, KV_HEADS, groups, DIM)
    k_groups, v_groups = (x.reshape(1, LENGTH, KV_HEADS, 1, DIM) for x in (k, v))
    vmapped = jax.jit(jax.vmap(fn, in_axes=2, out_axes=2))(q_groups, k_groups, v_groups)
    np.testing.assert_allclose(vmapped.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
