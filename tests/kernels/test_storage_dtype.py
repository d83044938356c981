"""bfloat16 / float16 inputs reach every matmul of the exact kernels in their own dtype,
with float32 accumulation (``preferred_element_type``): the form GPU tensor cores and
TPU MXUs run. Read from the traced program (the forward, and the backward of the kernels
with a custom VJP, whose backward the project writes), never timed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from attn_jax import kernels

# name -> (kernel call, whether its backward's matmuls are the project's own, so checked too)
CASES = {
    "dot_product": (lambda q, k, v: kernels.dense_attention(q, k, v, is_causal=True), False),
    "auto": (lambda q, k, v: kernels.get("auto")(q, k, v, is_causal=True), False),
    "flash": (
        lambda q, k, v: kernels.flash_attention(q, k, v, is_causal=True, block_q=8, block_k=8),
        True,
    ),
    "chunked": (
        lambda q, k, v: kernels.chunked_attention(
            q, k, v, is_causal=True, query_chunk_size=8, key_chunk_size=8
        ),
        True,
    ),
    "sliding_window": (
        lambda q, k, v: kernels.sliding_window_attention(
            q, k, v, local_window_size=(8, 0), block_size=8
        ),
        True,
    ),
    "ring": (lambda q, k, v: kernels.ring_attention(q, k, v, is_causal=True), True),
    "pallas_flash": (
        lambda q, k, v: kernels.pallas_flash_attention(
            q, k, v, is_causal=True, block_q=16, block_k=16
        ),
        True,
    ),
}


def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _subjaxprs(item)


def matmul_dtypes(jaxpr) -> list[tuple[str, str, str]]:
    """``(lhs, rhs, result)`` dtypes of every floating ``dot_general`` in ``jaxpr`` and
    the programs nested in it (loops, conds, custom VJPs, Pallas kernels)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.dtype for v in eqn.invars)
            if jnp.issubdtype(lhs, jnp.floating):
                found.append((str(lhs), str(rhs), str(eqn.outvars[0].aval.dtype)))
        for param in eqn.params.values():
            for sub in _subjaxprs(param):
                found.extend(matmul_dtypes(sub))
    return found


def traced_matmuls(fn, dtype, backward: bool) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 32, 2, 16)), dtype) for _ in range(3))
    program = fn
    if backward:
        program = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    return matmul_dtypes(jax.make_jaxpr(program)(q, k, v).jaxpr)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matmuls_take_16_bit_operands_and_accumulate_in_float32(name, dtype):
    fn, own_backward = CASES[name]
    matmuls = traced_matmuls(fn, dtype, backward=own_backward)
    assert matmuls, f"{name}: no matmul traced"
    want = (jnp.dtype(dtype).name, jnp.dtype(dtype).name, "float32")
    # flash's and ring's backward is their JVP transposed: the tangent terms' products are
    # rounded to the 16-bit dtype (accumulating in float32 inside), so that their
    # transposes multiply 16-bit cotangents (their accuracy:
    # test_16_bit_gradients_sum_over_blocks_in_float32).
    rounded = (*want[:2], jnp.dtype(dtype).name)
    allowed = {want, rounded} if name in ("flash", "ring") else {want}
    wrong = [m for m in matmuls if m not in allowed]
    assert not wrong, f"{name}: matmuls (lhs, rhs, out) other than {want}: {wrong}"


def test_the_check_sees_upcast_operands():
    def upcast(q, k, v):
        return kernels.dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)))

    matmuls = traced_matmuls(upcast, jnp.bfloat16, backward=False)
    assert matmuls and all(m[0] == "float32" for m in matmuls)


def _gradient_error(fn, q, k, v) -> float:
    """Largest error of ``fn``'s bfloat16 gradients against float64 attention of the same
    (bfloat16-rounded) inputs, relative to the largest gradient."""
    from attn_jax.kernels import reference

    cotangent = np.random.default_rng(1).normal(size=q.shape)
    loss = lambda *a: (fn(*a).astype(jnp.float32) * cotangent).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    _, exact = reference.dot_product_attention(
        *(np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v)),
        is_causal=True,
        d_out=cotangent,
    )
    exact = (exact["query"], exact["key"], exact["value"])
    return max(
        float(np.abs(np.asarray(g.astype(jnp.float32), np.float64) - e).max() / np.abs(e).max())
        for g, e in zip(grads, exact, strict=True)
    )


@pytest.mark.parametrize(
    "name", ["chunked", "sliding_window", "flash", pytest.param("ring", marks=pytest.mark.slow)]
)
def test_16_bit_gradients_sum_over_blocks_in_float32(name):
    """Kernels differentiated through many blocks stay about as accurate in bfloat16 as the
    dense kernel (block gradients rounded to bfloat16 before summing: 1.6x its error)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 512, 1, 16)), jnp.bfloat16) for _ in range(3))
    kernel = {
        "chunked": lambda q, k, v: kernels.chunked_attention(
            q, k, v, is_causal=True, query_chunk_size=16, key_chunk_size=16
        ),
        "sliding_window": lambda q, k, v: kernels.sliding_window_attention(
            q, k, v, is_causal=True, local_window_size=(512, 0), block_size=16
        ),
        "flash": lambda q, k, v: kernels.flash_attention(
            q, k, v, is_causal=True, block_q=16, block_k=16
        ),
        "ring": lambda q, k, v: kernels.ring_attention(
            q, k, v, is_causal=True, num_devices=4, block_q=16, block_k=16
        ),
    }[name]
    dense = _gradient_error(
        lambda q, k, v: kernels.dense_attention(q, k, v, is_causal=True), q, k, v
    )
    # 1.0-1.2x when block gradients sum in float32. flash's and ring's transposed JVP rounds
    # each block's products to bfloat16 (what keeps their backward's matmuls 16-bit): 1.6x
    # (flash) and 1.7x (ring, whose shards' gradients are rounded once more per step).
    bound = 1.75 if name in ("flash", "ring") else 1.35
    assert _gradient_error(kernel, q, k, v) <= bound * dense
