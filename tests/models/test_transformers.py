"""Transformer models: every exact kernel, causality, padding, sowing (decoding:
``test_decoding.py``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import decode, kernels, models

VOCAB = 23
EXACT = kernels.available(interface="dot_product", exact=True)
# Models pass padding and cache masks, so they take kernels that accept a mask. Besides the
# reference kernel, `flash` stands for the efficient ones here (`chunked` and `ring` have
# the same interface; every kernel's values and gradients are checked in tests/kernels, and
# `ring` trains the LM in tests/train/test_sequence_parallel.py; CI time).
MODEL_KERNELS = [n for n in EXACT if kernels.capabilities(n).mask and n not in ("chunked", "ring")]
CAUSAL = [n for n in MODEL_KERNELS if kernels.capabilities(n).causal]
# Every model with the reference kernel in float32; the kernel-facing families (causal
# self-attention, cross-attention, bidirectional) in bfloat16 and with the other kernels
# (the encoder poolings differ only after attention; CI time).
ZOO = [("dot_product", jnp.float32), ("dot_product", jnp.bfloat16)] + [
    (n, jnp.float32) for n in MODEL_KERNELS if n != "dot_product"
]
KERNEL_FACING = ("lm", "encoder_cls", "encoder_decoder")


def _options(**overrides) -> models.TransformerOptions:
    base = dict(width=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=32, max_len=16)
    return models.TransformerOptions(**{**base, **overrides})


def _tokens(shape, seed=0, low=3):
    return jax.random.randint(jax.random.key(seed), shape, low, VOCAB)


def _init(model, *args, **kwargs):
    """Jitted ``model.init`` (eager init compiles every op separately: much slower)."""
    return jax.jit(lambda *a: model.init(jax.random.key(0), *a, **kwargs))(*args)["params"]


def _apply(model, params, *args, **kwargs):
    """Jitted ``model.apply`` (one program instead of every op compiled on its own)."""
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


def _grads_are_finite_and_nonzero(grads):
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in leaves)
    assert sum(float(jnp.abs(g.astype(jnp.float32)).sum()) for g in leaves) > 0


def _model_zoo(options):
    """(model, args) for every Transformer model family."""
    src, tgt = _tokens((2, 7)), _tokens((2, 5), seed=1)
    return {
        "lm": (models.TransformerLM(VOCAB, options), (src,)),
        "encoder_cls": (models.TransformerEncoder(VOCAB, 3, options, pooling="cls"), (src,)),
        "encoder_attention_pool": (
            models.TransformerEncoder(VOCAB, 3, options, pooling="attention"),
            (src,),
        ),
        "encoder_tagging": (models.TransformerEncoder(VOCAB, 3, options, pooling="none"), (src,)),
        "encoder_decoder": (models.EncoderDecoder(VOCAB, VOCAB, options), (src, tgt)),
        "vit": (
            models.VisionTransformer(4, 4, options),
            (jax.random.normal(jax.random.key(2), (2, 8, 8, 1)),),
        ),
    }


@pytest.mark.parametrize("kernel, dtype", ZOO, ids=[f"{n}-{jnp.dtype(d).name}" for n, d in ZOO])
def test_every_model_runs_forward_and_backward_with_each_kernel(kernel, dtype):
    options = _options(attention=kernel, dtype=dtype, positions="rope", num_layers=1)
    for name, (model, args) in _model_zoo(options).items():
        if (kernel, dtype) != ("dot_product", jnp.float32) and name not in KERNEL_FACING:
            continue
        params = _init(model, *args)

        def loss(params, model=model, args=args):
            return jnp.mean(model.apply({"params": params}, *args) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        assert np.isfinite(float(value)), name
        _grads_are_finite_and_nonzero(grads)


def test_lm_is_causal_through_gradients():
    model = models.TransformerLM(VOCAB, _options(positions="rope"))
    inputs = jax.random.normal(jax.random.key(0), (1, 6, 16))
    params = _init(model, inputs=inputs)
    # d logits[0, i] / d inputs[0, j] for every (i, j): zero exactly when j > i.
    jac = jax.jit(jax.jacrev(lambda x: model.apply({"params": params}, inputs=x)[0].sum(-1)))(
        inputs
    )
    influence = np.abs(np.asarray(jac)).sum(-1)[:, 0]  # [i, j]
    future = np.triu(np.ones((6, 6), bool), k=1)
    assert np.all(influence[future] == 0)
    assert np.all(influence[~future] > 0)


@pytest.mark.parametrize("pooling", ["cls", "attention", "mean", "none"])
def test_encoder_ignores_padded_positions(pooling):
    model = models.TransformerEncoder(VOCAB, 3, _options(), pooling=pooling)
    tokens = _tokens((2, 7)).at[0, 4:].set(0).at[1, 6:].set(0)
    params = _init(model, tokens)
    out = _apply(model, params, tokens)
    # Same lengths, different (non-pad) garbage in the padded slots, given via `lengths`.
    garbage = jnp.where(tokens == 0, _tokens((2, 7), seed=5), tokens)
    lengths = jnp.array([4, 6])
    out_garbage = jax.jit(lambda p, t, n: model.apply({"params": p}, t, lengths=n))(
        params, garbage, lengths
    )
    if pooling == "none":  # tagging: compare the unpadded positions
        valid = np.asarray(tokens != 0)
        np.testing.assert_allclose(
            np.asarray(out_garbage)[valid], np.asarray(out)[valid], atol=1e-5
        )
    else:
        np.testing.assert_allclose(out_garbage, out, atol=1e-5)
    changed = _apply(model, params, garbage)  # garbage now counts as tokens
    assert not np.allclose(changed, out, atol=1e-3)


@pytest.mark.parametrize("kernel", ["linear", "performer", "sliding_window"])
def test_maskless_kernels_get_the_lengths_of_right_padded_inputs(kernel):
    window = {"local_window_size": (2, 2)} if kernel == "sliding_window" else None
    options = _options(attention=kernel, attention_kwargs=window, num_layers=1)
    model = models.TransformerEncoder(VOCAB, 3, options, pooling="mean")
    tokens = _tokens((2, 7)).at[0, 4:].set(0)
    params = _init(model, tokens)
    out = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))
    # Row 0 padded to 7 equals row 0 alone at its true length (features drawn per layer,
    # so the Performer computes the same function on every call).
    alone = _apply(model, params, tokens[:1, :4])
    np.testing.assert_allclose(out[:1], alone, atol=1e-5)
    np.testing.assert_allclose(out, _apply(model, params, tokens), atol=1e-5)


def test_encoder_decoder_ignores_padded_source():
    model = models.EncoderDecoder(VOCAB, VOCAB, _options())
    src = _tokens((2, 7)).at[:, 5:].set(0)
    tgt = _tokens((2, 4), seed=1)
    params = _init(model, src, tgt)
    out = _apply(model, params, src, tgt)
    # Move the padding boundary: padded slots hold pad, so encode ignores them.
    np.testing.assert_allclose(_apply(model, params, src[:, :5], tgt), out, atol=1e-5)


def _sowed(model, params, *args):
    _, state = jax.jit(
        lambda p, *a: model.apply({"params": p}, *a, sow_weights=True, mutable=["intermediates"])
    )(params, *args)
    return jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]


def test_sowed_weights_have_documented_shape_and_rows_sum_to_one():
    options = _options()
    lm = models.TransformerLM(VOCAB, options)
    tokens = _tokens((2, 6))
    params = _init(lm, tokens)
    sowed = _sowed(lm, params, tokens)
    assert len(sowed) == options.num_layers
    for _, weights in sowed:
        assert weights.shape == (2, options.num_heads, 6, 6)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert np.all(
            np.asarray(weights)[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0
        )

    encoder = models.TransformerEncoder(VOCAB, 3, options, pooling="mean")
    padded = tokens.at[0, 3:].set(0)
    params = _init(encoder, padded)
    for _, weights in _sowed(encoder, params, padded):
        assert weights.shape == (2, options.num_heads, 6, 6)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.asarray(weights)[0, :, :, 3:] == 0)  # padded keys get no weight

    encdec = models.EncoderDecoder(VOCAB, VOCAB, options)
    tgt = _tokens((2, 4), seed=1)
    params = _init(encdec, padded, tgt)
    shapes = sorted(w.shape for _, w in _sowed(encdec, params, padded, tgt))
    expected = sorted(
        [(2, 4, 6, 6)] * options.num_layers  # encoder self-attention
        + [(2, 4, 4, 4)] * options.num_layers  # decoder self-attention
        + [(2, 4, 4, 6)] * options.num_layers  # cross-attention
    )
    assert shapes == expected


def test_kernel_is_swapped_by_name():
    """A third-party kernel registered by the user drives every layer."""
    calls = []

    @kernels.register("test_counting", capabilities=kernels.capabilities("dot_product"))
    def counting(query, key, value, bias=None, mask=None, **kwargs):
        calls.append(query.shape)
        return kernels.dot_product_attention(query, key, value, bias, mask, **kwargs)

    try:
        tokens = _tokens((2, 6))
        ours = models.TransformerLM(VOCAB, _options(attention="test_counting"))
        reference = models.TransformerLM(VOCAB, _options())
        params = reference.init(jax.random.key(0), tokens)["params"]
        np.testing.assert_allclose(
            ours.apply({"params": params}, tokens),
            reference.apply({"params": params}, tokens),
            atol=1e-6,
        )
        assert len(calls) == 2  # one per layer
    finally:
        kernels.unregister("test_counting")


def test_lm_beam_size_one_equals_greedy():
    model = models.TransformerLM(VOCAB, _options())
    prompt = _tokens((2, 3))
    params = _init(model, prompt)
    greedy = decode.generate(model, params, prompt, max_new_tokens=5)
    beam = decode.generate(model, params, prompt, max_new_tokens=5, method="beam", beam_size=1)
    np.testing.assert_array_equal(greedy, beam)


def test_encoder_decoder_beam_size_one_equals_greedy():
    model = models.EncoderDecoder(VOCAB, VOCAB, _options())
    src = _tokens((2, 6)).at[1, 4:].set(0)
    params = _init(model, src, src)
    greedy = decode.translate(model, params, src, max_len=5, bos_id=1, eos_id=2)
    beam = decode.translate(
        model, params, src, max_len=5, bos_id=1, eos_id=2, method="beam", beam_size=1
    )
    np.testing.assert_array_equal(greedy, beam)
    # Greedy equals taking the argmax of the teacher-forced forward pass step by step.
    # (The decoder is causal, so a fixed-size buffer filled step by step gives the same
    # logits at step t as the growing prefix, with one compilation.)
    forward = jax.jit(model.apply)
    tgt = jnp.ones((2, 6), jnp.int32)
    for t in range(5):
        nxt = jnp.argmax(forward({"params": params}, src, tgt)[:, t], -1)
        tgt = tgt.at[:, t + 1].set(nxt.astype(jnp.int32))
    finished = np.cumsum(np.asarray(tgt[:, 1:]) == 2, axis=1) - (np.asarray(tgt[:, 1:]) == 2)
    expected = np.where(finished > 0, 0, np.asarray(tgt[:, 1:]))
    np.testing.assert_array_equal(greedy, expected)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attention", "nope", "unknown attention kernel 'nope'"),
        ("attention", "additive", "options.attention"),
        ("positions", "alibi", "options.positions"),
        ("num_heads", 3, "options.width"),
        ("num_kv_heads", 3, "options.num_heads"),
        ("dropout_rate", 1.5, "options.dropout_rate"),
        ("mlp_dim", -1, "options.mlp_dim"),
        ("attention_sinks", "many", "options.attention_sinks"),
        ("logits_soft_cap", -2.0, "options.logits_soft_cap"),
    ],
)
def test_bad_options_name_the_field(field, value, message):
    options = dataclasses.replace(_options(), **{field: value})
    model = models.TransformerLM(VOCAB, options)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), _tokens((1, 4)))


def test_mlp_dim_zero_makes_attention_only_layers():
    model = models.TransformerLM(VOCAB, _options(mlp_dim=0))
    tokens = _tokens((1, 4))
    params = _init(model, tokens)
    assert set(params["layer_0"]) == {"attention_norm", "attention"}
    assert model.apply({"params": params}, tokens).shape == (1, 4, VOCAB)


def test_dropout_is_keyed_and_reproducible():
    model = models.TransformerLM(VOCAB, _options(dropout_rate=0.3, attention_dropout_rate=0.3))
    tokens = _tokens((2, 6))
    params = _init(model, tokens)
    run = lambda seed: model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), model.apply({"params": params}, tokens))


@pytest.mark.parametrize("field, value", [("logits_soft_cap", 5.0), ("attention_sinks", "learned")])
def test_kernels_without_a_feature_are_refused_by_name(field, value):
    options = dataclasses.replace(_options(), attention="linear", **{field: value})
    with pytest.raises(ValueError, match=f"options.{field}.*flash"):
        models.TransformerLM(VOCAB, options).init(jax.random.key(0), _tokens((1, 4)))


@pytest.mark.parametrize(
    "kernel",
    [
        n
        for n in kernels.available(exact=True)
        if kernels.capabilities(n).dropout and kernels.capabilities(n).interface == "dot_product"
    ],
)
def test_attention_dropout_trains_on_every_exact_kernel_that_fuses_it(kernel):
    options = _options(
        attention=kernel,
        attention_dropout_rate=0.3,
        logits_soft_cap=10.0,
        attention_sinks="learned",
    )
    model = models.TransformerLM(VOCAB, options)
    tokens = _tokens((2, 6))
    params = _init(model, tokens)

    def loss(params, seed):
        logits = model.apply(
            {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(seed)}
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad = jax.jit(jax.grad(loss))
    g1, g1_again, g2 = grad(params, 1), grad(params, 1), grad(params, 2)
    leaves = jax.tree.leaves(g1)
    assert all(np.isfinite(x).all() for x in leaves)
    for a, b in zip(leaves, jax.tree.leaves(g1_again), strict=True):
        np.testing.assert_array_equal(a, b)
    sinks = [g for p, g in jax.tree_util.tree_leaves_with_path(g1) if "sinks" in str(p)]
    assert sinks and all(np.abs(s).max() > 0 for s in sinks)
    assert not all(np.allclose(a, b) for a, b in zip(leaves, jax.tree.leaves(g2), strict=True))
