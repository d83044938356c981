"""Score and mask functions, soft-capping, sinks, fused dropout, forward-mode AD and the
attention mass, in every exact kernel that has them, against the float64 reference
(values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import kernels
from attn_jax.kernels import block_features, blockwise
from attn_jax.kernels import reference as ref
from attn_jax.kernels import visibility as vis

from . import conformance as cf

OPTIONS = {
    "dot_product": {},
    "flash": dict(block_q=4, block_k=4),
    "chunked": dict(query_chunk_size=4, key_chunk_size=4),
    "ring": dict(num_devices=4, block_q=2, block_k=2),
}
KERNELS = list(OPTIONS)
BUCKETS = 7


def _bucket(qp, kp):
    return jnp.clip(kp - qp + BUCKETS // 2, 0, BUCKETS - 1)


def _features(table, sinks):
    """Feature name -> (kernel kwargs, reference kwargs)."""
    t5 = lambda s, b, h, qp, kp: s + table[h, _bucket(qp, kp)]
    docs = lambda b, h, qp, kp: (qp // 5 == kp // 5) | (kp == 0) | (b == 1)
    return {
        "score_fn": (dict(score_fn=t5), dict(score_fn=t5)),
        "mask_fn": (dict(mask_fn=docs), dict(mask_fn=docs)),
        "soft_cap": (dict(logits_soft_cap=1.5), dict(logits_soft_cap=1.5)),
        "sinks": (dict(sinks=sinks), dict(sinks=sinks)),
        "softmax_plus_one": (dict(sinks=0.0), dict(sinks=np.zeros(4))),
        "everything": (
            dict(score_fn=t5, mask_fn=docs, logits_soft_cap=2.0, sinks=sinks),
            dict(score_fn=t5, mask_fn=docs, logits_soft_cap=2.0, sinks=sinks),
        ),
    }


CASE = cf.Case("f", q_len=9, kv_len=11, heads=4, kv_heads=2, is_causal=True, kv_lengths=(7, 11))


def _table_gradient(d_scores: np.ndarray, q_len: int, kv_len: int) -> np.ndarray:
    """The reference gradient of the T5-style table from that at score_fn's output."""
    qp = np.arange(q_len)[:, None] + kv_len - q_len
    bucket = np.clip(np.arange(kv_len)[None, :] - qp + BUCKETS // 2, 0, BUCKETS - 1)
    out = np.zeros((d_scores.shape[-3], BUCKETS))
    per_head = d_scores.reshape(-1, *d_scores.shape[-3:]).sum(0)  # [heads, q, kv]
    for b in range(BUCKETS):
        out[:, b] = per_head[:, bucket == b].sum(-1)
    return out


@pytest.mark.parametrize(
    "feature", ["score_fn", "mask_fn", "soft_cap", "sinks", "softmax_plus_one", "everything"]
)
@pytest.mark.parametrize("name", KERNELS)
def test_feature_values_and_gradients_match_float64(name, feature):
    dtypes = [jnp.float32, jnp.bfloat16] if feature == "everything" else [jnp.float32]
    for dtype in dtypes:
        (q, k, v, _), kwargs = cf.make_inputs(CASE, dtype)
        rng = np.random.RandomState(3)
        table = jnp.asarray(rng.randn(4, BUCKETS), jnp.float32)
        sinks = jnp.asarray(rng.randn(4), jnp.float32)
        cotangent = jnp.asarray(rng.randn(*cf.output_shape(CASE)), dtype)

        @jax.jit
        def run(q, k, v, table, sinks, arrays, cotangent):
            def f(q, k, v, table, sinks):
                ours, _ = _features(table, sinks)[feature]
                return kernels.dot_product_attention(
                    q, k, v, **ours, **arrays, is_causal=True, implementation=name, **OPTIONS[name]
                )

            out, vjp = jax.vjp(f, q, k, v, table, sinks)
            return out, vjp(cotangent)

        arrays = {k_: v_ for k_, v_ in kwargs.items() if k_ != "is_causal"}
        out, (dq, dk, dv, dtable, dsinks) = run(q, k, v, table, sinks, arrays, cotangent)
        _, theirs = _features(table, sinks)[feature]
        expected, grads = ref.dot_product_attention(q, k, v, d_out=cotangent, **kwargs, **theirs)
        fwd_tol, grad_tol = cf.TOLERANCES[dtype]
        cf._record(dtype, "forward", cf._max_err(out, expected))
        assert cf._max_err(out, expected) <= fwd_tol, f"{name} {feature} {dtype.__name__}"
        for got, want in ((dq, grads["query"]), (dk, grads["key"]), (dv, grads["value"])):
            assert got.dtype == dtype
            err = cf._max_err(got, want)
            cf._record(dtype, "grad", err)
            assert err <= grad_tol, f"{name} {feature}: gradient error {err:.3g}"
        if "score_fn" in _features(table, sinks)[feature][0]:
            want = _table_gradient(grads["scores"], CASE.q_len, CASE.kv_len)
            assert cf._max_err(dtable, want) <= 4 * grad_tol, "score_fn parameter gradient"
        if feature in ("sinks", "everything"):
            assert cf._max_err(dsinks, grads["sinks"]) <= 4 * grad_tol, "sink gradient"


@pytest.mark.parametrize("name", KERNELS)
def test_attention_mass_is_the_dense_weights_summed_over_queries(name):
    (q, k, v, _), kwargs = cf.make_inputs(CASE, jnp.float32)
    mask_fn = lambda b, h, qp, kp: (qp - kp) % 3 != 1
    _, mass = kernels.dot_product_attention(
        q, k, v, **kwargs, mask_fn=mask_fn, sinks=0.5, return_attention_mass=True,
        implementation=name, **OPTIONS[name],
    )  # fmt: skip
    _, weights = ref.dot_product_attention(
        q, k, v, **kwargs, mask_fn=mask_fn, sinks=np.full(4, 0.5), return_weights=True
    )
    assert mass.shape == (2, 4, CASE.kv_len)
    np.testing.assert_allclose(mass, weights.sum(-2), atol=1e-5)


def _dropout(name, q, k, v, rng, **options):
    def loss(q, k, v):
        out = kernels.dot_product_attention(
            q, k, v, is_causal=True, dropout_rate=0.3, dropout_rng=rng, implementation=name,
            **options,
        )  # fmt: skip
        return out, (out * jnp.cos(out)).sum()

    out, grads = jax.jit(lambda *a: (loss(*a)[0], jax.grad(lambda *b: loss(*b)[1], (0, 1, 2))(*a)))(
        q, k, v
    )
    return out, grads


def test_fused_dropout_is_one_realisation_whatever_the_blocks_and_matches_dense_autodiff():
    (q, k, v, _), _ = cf.make_inputs(cf.Case("d", q_len=12, kv_len=12, heads=4, kv_heads=2),
                                     jnp.float32)  # fmt: skip
    rng = jax.random.key(7)
    runs = [
        _dropout("flash", q, k, v, rng, block_q=4, block_k=4),
        _dropout("flash", q, k, v, rng, block_q=4, block_k=4),
        _dropout("flash", q, k, v, rng, block_q=8, block_k=2),
        _dropout("chunked", q, k, v, rng, query_chunk_size=6, key_chunk_size=4),
        _dropout("ring", q, k, v, rng, num_devices=4, block_q=2, block_k=3),  # striped
        _dropout("ring", q, k, v, rng, num_devices=3, ordering="contiguous"),
    ]
    first = jax.tree.leaves(runs[0])
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(jax.tree.leaves(runs[1])[0]))
    for leaves in map(jax.tree.leaves, runs[1:]):
        for a, b in zip(first, leaves, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-6)
    # The dense computation with the same keep mask, differentiated by autodiff.
    keep = block_features.dropout_keep_mask(rng, 0.3, (2,), 4, 12, 12)
    factors = jnp.where(keep, 1 / 0.7, 0.0)
    causal = jnp.tril(jnp.ones((12, 12), bool))

    def dense(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1) * factors
        out = jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, 2, axis=2))
        return out, (out * jnp.cos(out)).sum()

    want = (dense(q, k, v)[0], jax.grad(lambda *a: dense(*a)[1], (0, 1, 2))(q, k, v))
    for a, b in zip(first, jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # And the float64 reference with that realisation.
    expected = ref.dot_product_attention(q, k, v, is_causal=True, dropout_factors=factors)
    np.testing.assert_allclose(first[0], expected, atol=1e-5)


def test_dropout_keep_rate_and_independence():
    rate = 0.25
    keep = np.asarray(block_features.dropout_keep_mask(jax.random.key(0), rate, (2,), 2, 256, 256))
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    x = keep.astype(np.float64)
    bound = 4 / np.sqrt(x[0, 0, :, :128].size)  # four standard errors of the smallest pair
    pairs = {
        "heads": (x[0, 0], x[0, 1]),
        "batch rows": (x[0, 0], x[1, 0]),
        "adjacent key blocks": (x[0, 0, :, :128], x[0, 0, :, 128:]),
        "adjacent query blocks": (x[0, 0, :128], x[0, 0, 128:]),
        "neighbouring keys": (x[0, 0, :, :-1], x[0, 0, :, 1:]),
        "neighbouring queries": (x[0, 0, :-1], x[0, 0, 1:]),
        "transpose": (x[0, 0], x[0, 0].T),
    }
    for what, (a, b) in pairs.items():
        corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(corr) < bound, f"{what}: correlation {corr:.4f}"
    other = np.asarray(block_features.dropout_keep_mask(jax.random.key(1), rate, (2,), 2, 256, 256))
    assert 0.5 < (other == keep).mean() < 0.7  # a different key, an independent mask
    shared = block_features.dropout_keep_mask(
        jax.random.key(0), rate, (2,), 2, 8, 8, broadcast=True
    )
    assert (np.asarray(shared) == np.asarray(shared)[:1, :1]).all()


def _loss(name):
    table = jnp.linspace(-1, 1, 4 * BUCKETS).reshape(4, BUCKETS)
    score_fn = lambda s, b, h, qp, kp: s + table[h, _bucket(qp, kp)]

    def loss(q, k, v, sinks):
        out = kernels.dot_product_attention(
            q, k, v, is_causal=True, score_fn=score_fn, logits_soft_cap=3.0, sinks=sinks,
            key_value_seq_lengths=jnp.array([5, 9]), implementation=name, **OPTIONS[name],
        )  # fmt: skip
        return jnp.sum(jnp.sin(out))

    return loss


def test_forward_mode_jvp_jacfwd_and_hessian_vector_products_match_dot_product():
    (q, k, v, _), _ = cf.make_inputs(cf.Case("h", q_len=7, kv_len=9, heads=4, kv_heads=2),
                                     jnp.float32)  # fmt: skip
    sinks = jnp.array([0.1, -0.3, 0.5, 0.0])
    tangents = jax.tree.map(lambda x: jnp.cos(3.0 * x), (q, k, v, sinks))
    results = {}
    for name in ("dot_product", "flash", "ring"):
        loss = _loss(name)
        grad = jax.grad(loss, argnums=(0, 1, 2, 3))
        jvp = jax.jit(lambda *p, f=loss: jax.jvp(f, p, tangents))(q, k, v, sinks)
        hvp = jax.jit(lambda *p, g=grad: jax.jvp(g, p, tangents)[1])(q, k, v, sinks)
        jac = jax.jit(jax.jacfwd(lambda q, f=loss: f(q, k, v, sinks)))(q)
        results[name] = (jvp, hvp, jac)
    for name in ("flash", "ring"):
        leaves = jax.tree.leaves(results[name])
        for a, b in zip(jax.tree.leaves(results["dot_product"]), leaves, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4, err_msg=name)


def test_pallas_flash_forward_mode_matches_dot_product_and_keeps_its_reverse_mode():
    """``forward_mode=True``: the Pallas forward kernel with a plain-JAX JVP rule (several
    query and key blocks, GQA, causal + lengths + segments)."""
    (q, k, v, _), _ = cf.make_inputs(cf.Case("h", q_len=20, kv_len=24, heads=4, kv_heads=2),
                                     jnp.float32)  # fmt: skip
    segments = jnp.array([[0] * 12 + [1] * 12, [0] * 24])
    kwargs = dict(
        is_causal=True, key_value_seq_lengths=jnp.array([24, 17]),
        query_segment_ids=segments[:, :20], key_value_segment_ids=segments,
    )  # fmt: skip
    options = dict(block_q=8, block_k=8, forward_mode=True)
    loss = lambda name, **o: (
        lambda q, k, v: jnp.sum(jnp.sin(kernels.get(name)(q, k, v, **kwargs, **o)))
    )
    tangents = jax.tree.map(lambda x: jnp.cos(3.0 * x), (q, k, v))
    results = {}
    for name, o in (("dot_product", {}), ("pallas_flash", options)):
        f, grad = loss(name, **o), jax.grad(loss(name, **o), argnums=(0, 1, 2))
        jvp = jax.jit(lambda *p, f=f: jax.jvp(f, p, tangents))(q, k, v)
        hvp = jax.jit(lambda *p, g=grad: jax.jvp(g, p, tangents)[1])(q, k, v)
        jac = jax.jit(jax.jacfwd(lambda x, f=f: f(q * x[0], k * x[1], v * x[2])))(jnp.ones(3))
        results[name] = (jvp, hvp, jac)
    for a, b in zip(*(jax.tree.leaves(r) for r in results.values()), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    # Reverse mode through the JVP's transpose equals the Pallas backward kernels'.
    by_jvp = jax.jit(jax.grad(loss("pallas_flash", **options), argnums=(0, 1, 2)))(q, k, v)
    by_vjp = jax.jit(jax.grad(loss("pallas_flash", block_q=8, block_k=8), argnums=(0, 1, 2)))(
        q, k, v
    )
    for a, b in zip(by_jvp, by_vjp, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_mask_fn_blocks_are_classified_once_hidden_blocks_skipped():
    """A 64-token document mask of four 16-token documents: flash visits the 16 diagonal
    blocks of 8 x 8 (of 64), all of them shown entirely (no mask evaluated there)."""
    q = k = v = jnp.ones((1, 64, 1, 4))
    docs = lambda b, h, qp, kp: qp // 16 == kp // 16
    call = kernels.api.bind(q, k, v, mask_fn=docs)
    c = blockwise.canonicalize(call, block_q=8, block_k=8)
    plan = blockwise.plan(c)
    classes = np.asarray(plan.classes)
    assert int(plan.count.sum()) == 16 and (classes[classes != vis.HIDDEN] == vis.FULL).all()
    mixed = kernels.api.bind(
        q, k, v, mask_fn=lambda b, h, qp, kp: (qp // 16 == kp // 16) & (qp != kp)
    )
    classes = np.asarray(
        blockwise.plan(blockwise.canonicalize(mixed, block_q=8, block_k=8)).classes
    )
    assert (classes == vis.PARTIAL).sum() == 8 and (classes == vis.FULL).sum() == 8


def test_bad_feature_arguments_name_themselves():
    q = k = v = jnp.ones((1, 4, 2, 4))
    for kwargs, name in (
        (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
        (dict(logits_soft_cap="big"), "logits_soft_cap"),
        (dict(sinks=jnp.zeros(3)), "sinks"),
        (dict(sinks=jnp.zeros((2, 2))), "sinks"),
        (dict(return_attention_mass=1), "return_attention_mass"),
        (dict(mask_fn=3), "mask_fn"),
    ):
        with pytest.raises(ValueError, match=name):
            kernels.dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(kernels.UnsupportedArgumentError, match="score_fn"):
        kernels.dot_product_attention(q, k, v, score_fn=lambda s, *_: s, implementation="linear")
