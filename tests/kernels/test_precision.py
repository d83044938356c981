"""``precision`` reaches every matmul of every registered dot_product kernel, forward and
backward (flax modules pass theirs through ``flax_attention_fn``): read from the traced
program, so it holds on CPU, where every float32 matmul is exact anyway."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from attn_jax import kernels

NAMES = kernels.available(interface="dot_product")
OPTIONS = {"performer": {"rng": jax.random.key(0)}, "ring": {"num_devices": 2}}
HIGHEST = jax.lax.Precision.HIGHEST


def matmul_precisions(jaxpr: jax.extend.core.Jaxpr) -> list:
    """The ``precision`` of every ``dot_general`` in ``jaxpr`` and the programs it calls
    (jit, scan, cond, custom derivatives, shard_map, pallas_call)."""
    found = [e.params["precision"] for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += matmul_precisions(sub)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_every_matmul_of_every_kernel_takes_the_calls_precision(name):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 8, 4, 16))
    k, v = (jax.random.normal(key, (2, 8, 2, 16)) for key in keys[1:])
    kernel = kernels.get(name)
    causal = {"is_causal": True} if kernels.capabilities(name).causal else {}

    def loss(q, k, v):
        # A list, as flax's PrecisionLike allows: kernels with static layouts must hash it.
        out = kernel(q, k, v, precision=[HIGHEST, HIGHEST], **causal, **OPTIONS.get(name, {}))
        return jnp.sum(out**2)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    precisions = matmul_precisions(jaxpr)
    assert precisions, "no matmul found"
    assert all(p == (HIGHEST, HIGHEST) for p in precisions), sorted(map(str, set(precisions)))
