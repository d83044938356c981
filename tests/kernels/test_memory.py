"""Compiled scratch memory grows linearly with sequence length for the efficient kernels
(read deterministically from XLA's ``memory_analysis()``, never timed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attn_jax import kernels

KERNELS = {
    "flash": lambda q, k, v: kernels.flash_attention(
        q, k, v, is_causal=True, block_q=128, block_k=128
    ),
    "chunked": lambda q, k, v: kernels.chunked_attention(
        q, k, v, is_causal=True, query_chunk_size=128, key_chunk_size=128
    ),
    "sliding_window": lambda q, k, v: kernels.sliding_window_attention(
        q, k, v, local_window_size=(32, 32), block_size=64
    ),
    "linear": lambda q, k, v: kernels.linear_attention(q, k, v, is_causal=True),
    "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
}


def scratch_bytes(fn, length: int, gradient: bool) -> int:
    """Temporary bytes of the compiled forward (or forward + backward) at ``length``."""
    q = jnp.zeros((1, length, 2, 32), jnp.float32)
    program = jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)) if gradient else fn
    return jax.jit(program).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("gradient", [False, True], ids=["forward", "gradient"])
@pytest.mark.parametrize("name", ["flash", "chunked", "sliding_window", "linear"])
def test_doubling_length_at_most_doubles_scratch(name, gradient):
    small, large = (scratch_bytes(KERNELS[name], n, gradient) for n in (2048, 4096))
    assert large <= 2.2 * small, f"{name}: {small} -> {large} bytes ({large / small:.2f}x)"


def test_the_measure_sees_quadratic_memory():
    small, large = (scratch_bytes(KERNELS["jax.nn"], n, False) for n in (2048, 4096))
    assert large >= 3.5 * small


def test_pallas_flash_forward_mode_keeps_memory_linear():
    """Its derivatives through the plain-JAX JVP (forward mode and its transpose)."""
    fn = lambda q, k, v: kernels.pallas_flash_attention(
        q, k, v, is_causal=True, block_q=128, block_k=128, forward_mode=True
    )
    jvp = lambda q, k, v: jax.jvp(lambda q: fn(q, k, v), (q,), (q,))[1]
    for name, program, gradient in (("gradient", fn, True), ("jvp", jvp, False)):
        small, large = (scratch_bytes(program, n, gradient) for n in (1024, 2048))
        assert large <= 2.2 * small, f"{name}: {small} -> {large} bytes ({large / small:.2f}x)"
