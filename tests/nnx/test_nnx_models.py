"""attn_jax.nnx: the NNX twins equal the linen models on the same weights, convert both
ways, decode through attn_jax.decode, and train as NNX modules."""

from __future__ import annotations

import dataclasses

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attn_jax import decode, models
from attn_jax import nnx as attn_nnx

KEY = jax.random.key(0)
OPTIONS = models.TransformerOptions(
    width=16, num_layers=2, num_heads=4, num_kv_heads=2, max_len=16, positions="rope",
    attention_sinks="learned", attention="dot_product",
)  # fmt: skip
TOKENS = jax.random.randint(KEY, (2, 6), 1, 11)
IMAGES = jax.random.normal(KEY, (2, 8, 8, 3))


def _models():
    vit_options = dataclasses.replace(OPTIONS, positions="learned", max_len=8, num_kv_heads=None)
    return {
        "lm": (models.TransformerLM(11, OPTIONS), (TOKENS,)),
        "lm_learned_softcap": (
            models.TransformerLM(
                11, dataclasses.replace(OPTIONS, positions="learned", logits_soft_cap=5.0)
            ),
            (TOKENS,),
        ),
        "encoder_attention_pool": (
            models.TransformerEncoder(11, 3, OPTIONS, pooling="attention"),
            (TOKENS.at[0, 4:].set(0),),
        ),
        "encoder_cls": (models.TransformerEncoder(11, 3, OPTIONS), (TOKENS,)),
        "encoder_decoder": (models.EncoderDecoder(11, 13, OPTIONS), (TOKENS, TOKENS[:, :4])),
        "vit": (models.VisionTransformer(5, 4, vit_options), (IMAGES,)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_nnx_twins_equal_linen_on_the_same_weights_both_ways(name):
    linen, inputs = _models()[name]
    params = linen.init(KEY, *inputs)["params"]
    expected = linen.apply({"params": params}, *inputs)
    twin = attn_nnx.from_linen(linen, params)
    np.testing.assert_allclose(twin(*inputs), expected, rtol=0, atol=1e-6)
    # The same parameter gradients (NNX's as the linen tree).
    linen_loss = lambda p: jnp.sum(linen.apply({"params": p}, *inputs) ** 2)
    linen_grads = jax.jit(jax.grad(linen_loss))(params)
    nnx_grads = nnx.jit(nnx.grad(lambda model: jnp.sum(model(*inputs) ** 2)))(twin)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
        nnx.to_pure_dict(nnx_grads),
        jax.tree.map(np.asarray, linen_grads),
    )
    back, back_params = attn_nnx.to_linen(twin)
    assert back == linen
    jax.tree.map(np.testing.assert_array_equal, back_params, jax.tree.map(np.asarray, params))
    # An NNX model built from scratch converts to linen and computes the same function.
    cls, kwargs = attn_nnx.nnx_twin(linen, params)
    fresh = cls(**kwargs, rngs=nnx.Rngs(1))
    linen_fresh, fresh_params = attn_nnx.to_linen(fresh)
    np.testing.assert_allclose(
        linen_fresh.apply({"params": fresh_params}, *inputs), fresh(*inputs), rtol=0, atol=1e-6
    )


def test_scanned_linen_models_convert_to_unrolled_nnx_and_back():
    scanned = models.TransformerLM(11, dataclasses.replace(OPTIONS, scan_layers=True))
    params = scanned.init(KEY, TOKENS)["params"]
    twin = attn_nnx.from_linen(scanned, params)
    np.testing.assert_allclose(
        twin(TOKENS), scanned.apply({"params": params}, TOKENS), rtol=0, atol=2e-6
    )
    linen, stacked = attn_nnx.to_linen(twin, scan_layers=True)
    assert linen.options.scan_layers and "layers" in stacked
    with pytest.raises(ValueError, match=r"options\.scan_layers"):
        attn_nnx.TransformerLM(11, scanned.options, rngs=nnx.Rngs(0))


def test_attention_layer_twin_self_and_cross():
    for cross in (False, True):
        linen = models.MultiHeadAttention(
            num_heads=4, num_kv_heads=2, attention="dot_product", cross_attention=cross,
            is_causal=not cross, rope=not cross, use_bias=True, sinks="plus_one",
        )  # fmt: skip
        x = jax.random.normal(KEY, (2, 5, 16))
        memory = jax.random.normal(jax.random.key(1), (2, 7, 12)) if cross else None
        params = linen.init(KEY, x, memory)["params"]
        twin = attn_nnx.from_linen(linen, params)
        assert twin.key.kernel.shape == (12 if cross else 16, 2, 4)
        np.testing.assert_allclose(
            twin(x, memory), linen.apply({"params": params}, x, memory), rtol=0, atol=1e-6
        )
        back, back_params = attn_nnx.to_linen(twin)
        assert back.cross_attention == cross and back.sinks == "plus_one"
        np.testing.assert_array_equal(
            back.apply({"params": back_params}, x, memory), twin(x, memory)
        )
    # A flax-style callable kernel (it gets dense masks), causal with RoPE.
    linen = models.MultiHeadAttention(
        num_heads=4, attention=flax.linen.dot_product_attention, is_causal=True, rope=True
    )
    params = linen.init(KEY, x)["params"]
    np.testing.assert_allclose(
        attn_nnx.from_linen(linen, params)(x), linen.apply({"params": params}, x), atol=1e-6
    )


@pytest.mark.parametrize(
    "attention, kwargs",
    [
        ("dot_product", {}),  # a KV cache
        ("sliding_window", {"local_window_size": (2, 0)}),  # a rolling cache
        ("linear", {}),  # a recurrent state
    ],
)
def test_generate_equals_linen_greedy_sampling_beam_and_ragged_prompts(attention, kwargs):
    options = dataclasses.replace(
        OPTIONS, attention=attention, attention_kwargs=kwargs or None, attention_sinks="none"
    )
    linen = models.TransformerLM(11, options)
    params = linen.init(KEY, TOKENS)["params"]
    twin = attn_nnx.from_linen(linen, params)
    lengths = jnp.array([3, 6])
    for method, extra in (("greedy", {}), ("sample", {"rng": KEY}), ("beam", {"beam_size": 2})):
        if attention != "dot_product" and method != "greedy":
            continue  # the searches are shared: one kernel checks them
        call = dict(max_new_tokens=4, method=method, prompt_lengths=lengths, **extra)
        expected = decode.generate(linen, params, TOKENS, **call)
        np.testing.assert_array_equal(decode.generate(twin, TOKENS, **call), expected)
    # The caller's module is untouched: decoding happened on a copy inside jit.
    assert not hasattr(twin.layer_0.attention, "cached_key")


def test_translate_and_cached_decoding_steps_equal_linen():
    linen = models.EncoderDecoder(11, 13, dataclasses.replace(OPTIONS, num_layers=1))
    src = TOKENS.at[1, 4:].set(0)  # padded source
    params = linen.init(KEY, src, src[:, :3])["params"]
    twin = attn_nnx.from_linen(linen, params)
    for method in ("greedy", "beam"):
        call = dict(max_len=5, bos_id=1, method=method, beam_size=2)
        np.testing.assert_array_equal(
            decode.translate(twin, src, **call), decode.translate(linen, params, src, **call)
        )
    # Step by step from the cache equals the teacher-forced logits (positions-based
    # visibility: each cached step sees its prefix).
    memory, memory_mask = twin.encode(src)
    twin.init_cache(2, 4, memory=memory)
    tgt = TOKENS[:, :4]
    step = nnx.jit(lambda model, token: model.decode(token, None, memory_mask, decode=True))
    steps = [step(twin, tgt[:, i : i + 1]) for i in range(4)]
    np.testing.assert_allclose(
        jnp.concatenate(steps, 1), twin.decode(tgt, memory, memory_mask), rtol=0, atol=2e-5
    )


def test_errors_name_the_argument():
    linen = models.TransformerLM(11, OPTIONS)
    params = linen.init(KEY, TOKENS)["params"]
    bad = jax.tree.map(lambda x: x, params)
    bad = {**bad, "final_norm": {"scale": bad["final_norm"]["scale"]}}
    with pytest.raises(ValueError, match="missing parameter 'final_norm/bias'"):
        attn_nnx.from_linen(linen, bad)
    wrong = {**params, "final_norm": {**params["final_norm"], "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"'final_norm/bias' is float32\[3\], expected"):
        attn_nnx.from_linen(linen, wrong)
    with pytest.raises(ValueError, match="from_linen: argument 'model'"):
        attn_nnx.from_linen(models.Seq2SeqRNN(5, 5), {})
    twin = attn_nnx.from_linen(linen, params)
    with pytest.raises(ValueError, match="init_cache"):
        twin(TOKENS, decode=True)
    dropout = attn_nnx.TransformerLM(
        11, dataclasses.replace(OPTIONS, attention_dropout_rate=0.1), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="argument 'rngs'"):
        dropout(TOKENS, deterministic=False)
    assert dropout(TOKENS, deterministic=False, rngs=nnx.Rngs(dropout=1)).shape == (2, 6, 11)


def test_an_nnx_model_trains_with_nnx_optimizer_and_sows_weights():
    model = attn_nnx.TransformerLM(11, OPTIONS, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, TOKENS)) for _ in range(5)]
    assert losses[-1] < losses[0]
    _, weights = nnx.capture(model, nnx.Intermediate)(TOKENS, sow_weights=True)
    (w,) = weights["layer_1"]["attention"]["attention_weights"]
    assert w.shape == (2, 4, 6, 6)
    total = np.asarray(w).sum(-1)  # below 1: the learned sinks take their share
    assert np.all(total > 0) and np.all(total <= 1 + 1e-5)
