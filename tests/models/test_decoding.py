"""Cached decoding equals the full forward pass, for every registered ``dot_product`` kernel.

Each kernel decodes in its own form (a KV cache read with query positions, a rolling
window cache, a recurrent state), through the same model code: prefill of prompts of
different lengths, then one token, then several tokens at once; LM (GQA, RoPE with a
window where the kernel has windows, learned positions) and encoder-decoder.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import decode, kernels, models

VOCAB = 23
DECODING = kernels.available(interface="dot_product")
# Kernel options that keep the tests small: ring over 2 of the simulated devices.
OPTIONS = {"ring": {"num_devices": 2}, "pallas_flash": {"block_q": 8, "block_k": 8}}
# One layer: the cache logic is per layer (and every layer is the same code).


def _options(kernel, *, positions, window=False, **overrides) -> models.TransformerOptions:
    kwargs = dict(OPTIONS.get(kernel, {}))
    if window:
        kwargs["local_window_size"] = (3, 0)
    base = dict(width=16, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=32, max_len=16)
    return models.TransformerOptions(
        **{**base, **overrides},
        attention=kernel,
        attention_kwargs=kwargs or None,
        positions=positions,
    )


def _init(model, *args, **kwargs):
    return jax.jit(lambda *a: model.init(jax.random.key(0), *a, **kwargs))(*args)["params"]


def _tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 3, VOCAB)


# Learned positions without a window for one kernel of each decode form (and `flash` for
# the blockwise ones): positions are model code, the same for every kernel (CI time).
LEARNED = ("dot_product", "flash", "sliding_window", "linear")


def _variants():
    for kernel in DECODING:
        window = kernels.capabilities(kernel).window
        yield pytest.param(kernel, "rope", window, id=f"{kernel}-rope{'-window' if window else ''}")
        if kernel in LEARNED:
            yield pytest.param(kernel, "learned", False, id=f"{kernel}-learned")


@pytest.mark.parametrize("kernel, positions, window", list(_variants()))
def test_lm_decoding_equals_the_full_forward_pass(kernel, positions, window):
    model = models.TransformerLM(VOCAB, _options(kernel, positions=positions, window=window))
    tokens = _tokens((2, 12))
    _check_decoding(model, tokens, _init(model, tokens))


@pytest.mark.parametrize("sinks", ["learned", "plus_one"])
@pytest.mark.parametrize("kernel", ["dot_product", "flash", "chunked"])
def test_decoding_keeps_soft_cap_and_sinks(kernel, sinks):
    options = _options(kernel, positions="rope", logits_soft_cap=2.0, attention_sinks=sinks)
    model = models.TransformerLM(VOCAB, options)
    tokens = _tokens((2, 12))
    params = _init(model, tokens)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert any("sinks" in p for p in paths) == (sinks == "learned")
    # Sinks away from their zero initialisation, so that decoding must carry them.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.5 if "sinks" in jax.tree_util.keystr(p) else x, params
    )
    _check_decoding(model, tokens, params)


def _check_decoding(model, tokens, params):
    full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    step = jax.jit(
        lambda cache, tokens, lengths: model.apply(
            {"params": params, "cache": cache},
            tokens,
            lengths=lengths,
            decode=True,
            mutable=["cache"],
        )
    )
    lengths = np.array([5, 3])  # ragged prompts, right-padded with junk
    prompt = np.asarray(tokens[:, :5]).copy()
    prompt[1, 3:] = 0
    logits, state = step(decode.init_cache(model, jnp.zeros((2, 16), jnp.int32)), prompt, lengths)
    rows = np.arange(2)[:, None]
    for b in range(2):
        np.testing.assert_allclose(logits[b, : lengths[b]], full[b, : lengths[b]], atol=1e-4)
    # One token for each sequence, then three at once, each continuing its own prompt.
    for count in (1, 3):
        at = lengths[:, None] + np.arange(count)[None, :]
        logits, state = step(state["cache"], np.asarray(tokens)[rows, at], None)
        np.testing.assert_allclose(logits, full[rows, at], atol=1e-4, err_msg=f"{count} tokens")
        lengths = lengths + count
    cache_lengths = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["cache"])
        if "cache_lengths" in jax.tree_util.keystr(path)
    ]
    assert cache_lengths and all(np.array_equal(c, lengths) for c in cache_lengths)


# One kernel of each decode form: the cross-attention cache is model code (the LM test
# runs every kernel's self-attention cache; CI time).
@pytest.mark.parametrize("kernel", ["dot_product", "sliding_window", "linear"])
def test_encoder_decoder_decoding_caches_the_memory_once(kernel):
    model = models.EncoderDecoder(VOCAB, VOCAB, _options(kernel, positions="sinusoidal"))
    src = _tokens((2, 7)).at[1, 5:].set(0)  # padded source
    tgt = _tokens((2, 6), seed=1)
    params = _init(model, src, tgt)
    full = jax.jit(model.apply)({"params": params}, src, tgt)
    encode = jax.jit(lambda src: model.apply({"params": params}, src, method=model.encode))
    memory, memory_mask = encode(src)
    create = jax.jit(
        lambda memory: model.apply(
            {"params": params},
            jnp.zeros((2, 8), jnp.int32),
            memory,
            memory_mask,
            decode=True,
            mutable=["cache"],
            method=models.EncoderDecoder.decode,
        )[1]
    )
    created = create(memory)
    cross = created["cache"]["decoder"]["layer_0"]["cross_attention"]
    assert cross["cross_key"].shape[:2] == (2, 7)  # the memory's keys, projected once
    step = jax.jit(
        lambda cache, tokens: model.apply(
            {"params": params, "cache": cache},
            tokens,
            None,  # no memory: the steps read the cached cross-attention keys/values
            memory_mask,
            decode=True,
            mutable=["cache"],
            method=models.EncoderDecoder.decode,
        )
    )
    cache, outs = created["cache"], []
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        logits, state = step(cache, tgt[:, start:stop])
        cache = state["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_rolling_and_recurrent_caches_do_not_grow_with_the_sequence():
    def cache_bytes(kernel, window, max_len):
        model = models.TransformerLM(
            VOCAB, _options(kernel, positions="rope", window=window, max_len=max_len)
        )
        cache = decode.init_cache(model, jnp.zeros((1, max_len), jnp.int32))
        layer = cache["layer_0"]["attention"]
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer)), layer

    short, layer = cache_bytes("sliding_window", True, 64)
    long, _ = cache_bytes("sliding_window", True, 1024)
    assert short == long and layer["cached_key"].shape[1] == 4  # left + 1 = 3 + 1 slots
    assert cache_bytes("linear", False, 64)[0] == cache_bytes("linear", False, 1024)[0]
    dense_short, dense_long = (cache_bytes("dot_product", True, n)[0] for n in (64, 1024))
    assert dense_long > 10 * dense_short  # the KV cache holds every position


# A KV cache and a rolling cache: hashing the options is model code (CI time).
@pytest.mark.parametrize("kernel", ["dot_product", "sliding_window"])
def test_generate_and_translate_with_attention_kwargs(kernel):
    options = _options(kernel, positions="rope", window=True)
    assert hash(options) == hash(_options(kernel, positions="rope", window=True))
    with pytest.raises((TypeError, ValueError), match="immutable"):
        options.attention_kwargs["local_window_size"] = (1, 0)
    lm = models.TransformerLM(VOCAB, options)
    prompt = _tokens((2, 4))
    params = _init(lm, prompt)
    for method in ("greedy", "beam"):
        out = decode.generate(lm, params, prompt, max_new_tokens=3, method=method, beam_size=2)
        assert out.shape == (2, 3)
    translator = models.EncoderDecoder(VOCAB, VOCAB, options)
    src, tgt = _tokens((2, 5)), _tokens((2, 4), seed=1)
    params = _init(translator, src, tgt)
    out = decode.translate(translator, params, src, max_len=4, bos_id=1, method="beam")
    assert out.shape == (2, 4)


def test_models_take_a_flax_style_attention_callable():
    """A callable ``attention_fn`` (flax's own) gets dense masks, also when decoding."""
    ours = _options("dot_product", positions="rope", num_kv_heads=None)  # flax: no GQA
    theirs = models.TransformerOptions(
        **{**vars(ours), "attention": nn.dot_product_attention, "attention_kwargs": None}
    )
    tokens = _tokens((2, 8))
    params = _init(models.TransformerLM(VOCAB, ours), tokens)
    lm = models.TransformerLM(VOCAB, theirs)
    np.testing.assert_allclose(
        lm.apply({"params": params}, tokens),
        models.TransformerLM(VOCAB, ours).apply({"params": params}, tokens),
        atol=1e-5,
    )
    greedy = decode.generate(lm, params, tokens[:, :3], max_new_tokens=4)
    expected = decode.generate(
        models.TransformerLM(VOCAB, ours), params, tokens[:, :3], max_new_tokens=4
    )
    np.testing.assert_array_equal(greedy, expected)


def test_heavy_hitter_evictions_keep_the_recent_and_the_heaviest():
    from attn_jax.models.attention_core import heavy_hitter_evictions

    mass = jnp.array([[5.0, 1.0, 3.0, 0.5, 2.0, 9.0, 0.0, 0.0]])
    evicted = jnp.zeros((1, 8), bool).at[0, 1].set(True)
    # 6 cached tokens, budget 4 with the 2 latest (slots 4, 5) always kept: of slots 0, 2, 3
    # (slot 1 is gone already) the 2 heaviest stay.
    out = heavy_hitter_evictions(mass, evicted, jnp.array([6]), budget=4, recent=2)
    np.testing.assert_array_equal(out[0], [False, True, False, True, False, False, False, False])


@pytest.mark.parametrize("kernel", ["dot_product", "flash"])
def test_kv_budget_evicts_down_to_the_budget_and_a_large_one_changes_nothing(kernel):
    tokens = _tokens((2, 12))
    base = _options(kernel, positions="rope")
    logits = {}
    for budget in (None, 16, 5):
        options = (
            base if budget is None else dataclasses.replace(base, kv_budget=budget, kv_recent=2)
        )
        model = models.TransformerLM(VOCAB, options)
        params = _init(model, tokens)
        step = jax.jit(
            lambda cache, t, model=model, params=params: model.apply(
                {"params": params, "cache": cache}, t, decode=True, mutable=["cache"]
            )
        )
        cache = decode.init_cache(model, jnp.zeros((2, 16), jnp.int32))
        outs = []
        for i in range(12):
            out, state = step(cache, tokens[:, i : i + 1])
            cache = state["cache"]
            outs.append(out)
        logits[budget] = np.concatenate(outs, 1)
        if budget == 5:
            evicted = [
                x for p, x in jax.tree_util.tree_leaves_with_path(cache) if "evicted" in str(p)
            ]
            assert evicted and all((np.asarray(e).sum(1) == 12 - 5).all() for e in evicted)
            assert all(not np.asarray(e)[:, 10:12].any() for e in evicted)  # the 2 latest kept
    np.testing.assert_allclose(logits[16], logits[None], atol=1e-5)
    # Up to the budget nothing is evicted; after it, the answers change.
    np.testing.assert_allclose(logits[5][:, :5], logits[None][:, :5], atol=1e-5)
    assert not np.allclose(logits[5][:, 6:], logits[None][:, 6:], atol=1e-3)
