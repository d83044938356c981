"""Ring attention: exact on rings of 1, 2, 4 and 8 simulated devices, inside shard_map,
with both orderings; memory per device shrinks with the ring.

The registry's ``ring`` (every device: 8 here) runs the whole conformance suite in
``test_conformance.py``; this file runs its cases on the smaller rings too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attn_jax import kernels
from attn_jax.kernels import patterns, ring
from attn_jax.kernels import visibility as vis
from tests.kernels import conformance as cf


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2, 4])
@pytest.mark.parametrize("case", cf.CASES, ids=lambda c: c.name)
def test_smaller_rings_pass_the_conformance_cases(devices, case):
    """Every conformance case in float32 on rings of 1, 2 and 4 devices, marked slow: the
    registry's ring of 8 runs the whole suite (float16 included) in test_conformance.py,
    and test_features.py runs every feature on a ring of 4 (a mesh of some devices)."""
    kernel = functools.partial(kernels.ring_attention, num_devices=devices)
    if case.needs() - set(kernels.capabilities("ring").supported()):
        cf.check_unsupported_raises(kernel, case)
        return
    cf.check_against_reference(kernel, case, jnp.float32)


def _qkv(batch=2, length=16, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.float32) for _ in range(2)
    )
    return q, k, v


@pytest.mark.parametrize("ordering", ring.ORDERINGS)
def test_both_orderings_give_the_same_values_and_gradients(ordering):
    q, k, v = _qkv()
    kwargs = {"is_causal": True, "key_value_seq_lengths": jnp.array([16, 9])}

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, **kwargs)))

    ring_fn = functools.partial(kernels.ring_attention, num_devices=4, ordering=ordering)
    expected = jax.value_and_grad(functools.partial(loss, kernels.dot_product_attention), (0, 1, 2))
    actual = jax.jit(jax.value_and_grad(functools.partial(loss, ring_fn), (0, 1, 2)))
    (value_a, grads_a), (value_e, grads_e) = actual(q, k, v), expected(q, k, v)
    np.testing.assert_allclose(value_a, value_e, rtol=1e-5)
    for a, e in zip(grads_a, grads_e, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5)


def test_inside_shard_map_the_kernel_takes_local_shards():
    devices = 4
    q, k, v = _qkv(length=16)
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("seq",))
    seq = P(None, "seq")

    def local(q, k, v):
        return kernels.ring_attention(q, k, v, axis_name="seq", is_causal=True)  # contiguous

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq))
    expected = kernels.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(sharded(q, k, v), expected, atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(sharded(*a) ** 2), (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(
        lambda *a: jnp.sum(kernels.dot_product_attention(*a, is_causal=True) ** 2), (0, 1, 2)
    )(q, k, v)
    for a, e in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5)
    with pytest.raises(ValueError, match="argument 'mask' is not supported with 'axis_name'"):
        jax.shard_map(
            lambda q, k, v: kernels.ring_attention(
                q, k, v, axis_name="seq", mask=jnp.ones((4, 4), bool)
            ),
            mesh=mesh,
            in_specs=(seq,) * 3,
            out_specs=seq,
        )(q, k, v)


def test_features_on_a_callers_shards_match_whole_arrays():
    """score_fn (ALiBi closing over its slopes), mask_fn, soft cap, sinks, fused dropout and
    the attention mass inside the caller's shard_map (shards striped by the caller) equal
    the whole-array kernel: values, the mass and gradients (sinks' included)."""
    devices, length = 4, 16
    q, k, v = _qkv(length=length)
    slopes = patterns.alibi_slopes(4)
    sinks = jnp.array([0.3, -0.2, 0.0, 1.0])
    features = dict(
        is_causal=True,
        score_fn=patterns.alibi(slopes),
        mask_fn=patterns.document_mask(jnp.array([[0] * 6 + [1] * 10, [0] * 16])),
        logits_soft_cap=4.0,
        dropout_rate=0.2,
        dropout_rng=jax.random.key(3),
        return_attention_mass=True,
    )
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("seq",))
    seq, heads = P(None, "seq"), P(None, None, "seq")

    def local(q, k, v, sinks):
        return kernels.ring_attention(
            q, k, v, sinks=sinks, axis_name="seq", ordering="striped", block_q=2, block_k=2,
            **features,
        )  # fmt: skip

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, P()), out_specs=(seq, heads))
    stripe = lambda x: ring._stripe(x, 1, devices)
    unstripe = lambda x, axis=1: ring._unstripe(x, axis, devices)

    def on_shards(q, k, v, sinks):
        out, mass = sharded(stripe(q), stripe(k), stripe(v), sinks)
        return unstripe(out), unstripe(mass, 2)

    def whole(q, k, v, sinks):
        return kernels.flash_attention(q, k, v, sinks=sinks, block_q=4, block_k=4, **features)

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]))
    for got, want in (
        (jax.jit(on_shards)(q, k, v, sinks), whole(q, k, v, sinks)),
        (jax.jit(jax.grad(loss(on_shards), (0, 1, 2, 3)))(q, k, v, sinks),
         jax.grad(loss(whole), (0, 1, 2, 3))(q, k, v, sinks)),
    ):  # fmt: skip
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5)


def _shard_scratch(devices: int, shard: int) -> int:
    """Per-device scratch of the gradient of ring attention inside a caller's shard_map,
    with ``shard`` rows per device."""
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("seq",))
    spec = jax.sharding.NamedSharding(mesh, P(None, "seq"))
    q, k, v = (
        jax.ShapeDtypeStruct((1, devices * shard, 2, 16), jnp.float32, sharding=spec)
        for _ in range(3)
    )
    local = lambda q, k, v: kernels.ring_attention(
        q, k, v, axis_name="seq", is_causal=True, block_q=128, block_k=128
    )
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 3,
                           out_specs=P(None, "seq"))  # fmt: skip
    fn = jax.grad(lambda *a: jnp.sum(mapped(*a)), (0, 1, 2))
    return jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_gradient_memory_per_device_is_that_of_its_shard_whatever_the_ring():
    """The backward pass (JAX's transpose of the ring's JVP) fetches each step's shard
    again instead of keeping every step's: with 512 rows per device, the per-device
    scratch of the gradient is the same on rings of 2 and 8 devices."""
    two, eight = _shard_scratch(2, 512), _shard_scratch(8, 512)
    assert eight <= 1.05 * two, (two, eight)


def _shown_tiles(ordering, devices=4, shard=4, tile=2, mask_fn=None):
    """``{(me, src, iq, jk)}``: the tiles of device ``me``'s queries against device
    ``src``'s keys that are computed (not hidden) in a causal ring over 16 positions, from
    the class table the kernel computes once per call."""
    block = kernels.blockwise.BlockLayout(
        q_len=16, kv_len=16, kv_heads=1, groups=1, block_q=shard, block_k=shard,
        num_q_blocks=devices, num_k_blocks=devices, scale=1.0, is_causal=True, window=None,
        fns=kernels.block_features.BlockFunctions(mask_fn=mask_fn),
    )  # fmt: skip
    layout = ring.RingLayout(block, devices, ordering, "seq", tile, tile)

    def classes(_):
        me = jax.lax.axis_index("seq").astype(jnp.int32)
        positions = ring.shard_positions(ordering, me, shard, devices)[None, :]
        tok = vis.Tokens(positions, jnp.ones((1, shard), bool))
        tok = tok.map(lambda x: kernels.block_features.varying(x, "seq"))
        return ring._tile_classes(layout, tok, tok, None, ())[None]

    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("seq",))
    table = jax.shard_map(classes, mesh=mesh, in_specs=P("seq"), out_specs=P("seq"))(
        jnp.zeros(devices)
    )
    table = np.asarray(table)  # [me, step, iq, jk]
    return {
        (me, (me - step) % devices, iq, jk)
        for me, step, iq, jk in zip(*np.nonzero(table != vis.HIDDEN), strict=True)
    }


def test_causal_tiles_hidden_from_every_query_are_skipped():
    shown = _shown_tiles("contiguous")
    assert {(me, src) for me, src, _, _ in shown} == {
        (me, src) for me in range(4) for src in range(me + 1)
    }
    # Striped shards mix early and late positions: every step has visible tiles.
    striped = _shown_tiles("striped")
    assert {(me, src) for me, src, _, _ in striped} == {
        (me, src) for me in range(4) for src in range(4)
    }
    # mask_fn refines the table: keys of even positions only hide no causal tile here,
    # keys in the first half hide every tile of the second half's keys.
    first_half = lambda b, h, qp, kp: kp < 8
    assert {(me, src) for me, src, _, _ in _shown_tiles("contiguous", mask_fn=first_half)} == {
        (me, src) for me in range(4) for src in range(min(me, 1) + 1)
    }


@pytest.mark.parametrize("ordering", ring.ORDERINGS)
def test_several_tiles_per_ring_step_with_skipping_stay_exact(ordering):
    q, k, v = _qkv(length=24)
    kwargs = {"is_causal": True, "local_window_size": (5, 0)}
    fn = functools.partial(
        kernels.ring_attention, num_devices=2, ordering=ordering, block_q=4, block_k=3
    )
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a, **kwargs)))
    value, grads = jax.jit(jax.value_and_grad(loss(fn), (0, 1, 2)))(q, k, v)
    expected, expected_grads = jax.value_and_grad(loss(kernels.dot_product_attention), (0, 1, 2))(
        q, k, v
    )
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for a, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ordering": "zigzag"}, "'ordering': expected one of"),
        ({"num_devices": 99}, "'num_devices' must be 1..8"),
        ({"num_devices": 2, "devices": jax.devices()[:2]}, "at most one of"),
    ],
)
def test_bad_ring_arguments_are_named(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        kernels.ring_attention(q, k, v, **kwargs)


def test_inside_pmap_without_an_axis_name_it_runs_on_each_device():
    q, k, v = _qkv(batch=2)
    stacked = [jnp.stack([x, x]) for x in (q, k, v)]
    out = jax.pmap(lambda q, k, v: kernels.ring_attention(q, k, v, is_causal=True))(*stacked)
    expected = kernels.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out[1], expected, atol=1e-5)


def test_residual_and_its_gradient_match_the_reference():
    q, k, v = _qkv(length=12)
    kwargs = {"is_causal": True, "return_residual": True}

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, **kwargs)
        return jnp.sum(out**2) + jnp.sum(jnp.cos(lse))

    ring_fn = functools.partial(kernels.ring_attention, num_devices=4)
    _, lse = jax.jit(functools.partial(ring_fn, **kwargs))(q, k, v)
    _, want = kernels.dot_product_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(lse, want, atol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(loss, ring_fn), (0, 1, 2)))(q, k, v)
    want_grads = jax.grad(functools.partial(loss, kernels.dot_product_attention), (0, 1, 2))(
        q, k, v
    )
    for a, e in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5)


def test_vmap_over_the_ring_equals_its_batch_dimension():
    q, k, v = _qkv(batch=3, length=8)
    ring_fn = functools.partial(kernels.ring_attention, num_devices=4, is_causal=True)
    vmapped = jax.jit(jax.vmap(ring_fn))(q[:, None], k[:, None], v[:, None])[:, 0]
    np.testing.assert_allclose(vmapped, jax.jit(ring_fn)(q, k, v), atol=1e-6)


def test_shards_are_padded_by_less_than_a_row_per_tile():
    for length, devices, block in [(4100, 8, 512), (513, 1, 512), (1024, 4, 128), (7, 8, 512)]:
        shard, tile = ring._shard_and_tile(length, devices, block)
        needed = -(-length // devices)
        assert shard % tile == 0 and tile <= block
        assert needed <= shard < needed + shard // tile
    assert ring._divisor_tile(1034, 512, "block_q") == 94
    with pytest.raises(ValueError, match="shard length 521 has no divisor near argument"):
        ring._divisor_tile(521, 512, "block_q")
