"""Models over image patches (``source=PatchEmbedder``): the ViT encoder-decoder and the
"show, attend and tell" RNN decode images with ``decode.translate`` (greedy and beam), the
greedy output is the teacher-forced argmax, and the token models' contracts still hold."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import decode, models
from tests.models.random_params import random_params

# The sizes of tests/train/test_captions.py's tiny configs (8 test strips of 8 x 48 pixels,
# 13 words, captions of up to 6 words + <eos>, beam of 2): the decoding programs compile
# once per test run.
BATCH, VOCAB, MAX_LEN, BOS, EOS = 8, 13, 7, 1, 2
IMAGES = np.random.RandomState(0).rand(BATCH, 8, 48).astype(np.float32)  # 2 x 12 patches
PATCHES = 24
TGT = np.full((BATCH, MAX_LEN), BOS, np.int32)
DECODE = {"max_len": MAX_LEN, "bos_id": BOS, "eos_id": EOS, "pad_id": 0}


def _vit():
    options = models.TransformerOptions(
        width=16, num_layers=1, num_heads=2, mlp_dim=32, positions="sinusoidal", max_len=7
    )
    return models.EncoderDecoder(0, VOCAB, options, source=models.PatchEmbedder(16, 4))


def _rnn():
    source = models.PatchEmbedder(8, 4, conv_channels=(32,))
    return models.Seq2SeqRNN(
        0, VOCAB, embed_dim=8, hidden_dim=16, encoder_cell="none", bidirectional=False,
        source=source,
    )  # fmt: skip


@functools.cache
def _setup(name: str):
    model = {"vit": _vit, "rnn": _rnn}[name]()
    return model, random_params(model, IMAGES, TGT, seed=1)


@pytest.mark.parametrize("name", ["vit", "rnn"])
def test_translate_decodes_images_greedy_and_beam(name):
    model, params = _setup(name)
    greedy = decode.translate(model, params, IMAGES, **DECODE)
    assert greedy.shape == (BATCH, MAX_LEN) and greedy.dtype == jnp.int32
    beam = decode.translate(model, params, IMAGES, **DECODE, method="beam", beam_size=2)
    assert beam.shape == (BATCH, MAX_LEN)
    assert ((np.asarray(beam) >= 0) & (np.asarray(beam) < VOCAB)).all()
    # Greedy decoding feeds its own outputs: teacher forcing on them gives the same argmax
    # (up to the first <eos>; then it pads).
    tgt_in = np.concatenate([np.full((BATCH, 1), BOS), np.asarray(greedy)[:, :-1]], 1)
    forward = lambda p, t: model.apply(
        {"params": p}, IMAGES, t, sow_weights=True, mutable=["intermediates"]
    )
    logits, state = jax.jit(forward)(params, tgt_in)
    greedy = np.asarray(greedy)
    ended = np.cumsum(np.cumsum(greedy == EOS, 1), 1) > 1  # after the first <eos>
    np.testing.assert_array_equal(np.where(ended, 0, np.argmax(logits, -1)), greedy)
    # One weight per patch for every output word, summing to 1.
    if name == "vit":
        weights = state["intermediates"]["decoder"]["layer_0"]["cross_attention"]
        assert weights["attention_weights"][0].shape == (BATCH, 2, MAX_LEN, PATCHES)  # 2 heads
    else:
        weights = state["intermediates"]
        assert weights["attention_weights"][0].shape == (BATCH, 1, MAX_LEN, PATCHES)
    np.testing.assert_allclose(weights["attention_weights"][0].sum(-1), 1.0, rtol=1e-5)


def test_patch_source_parameters():
    shapes = jax.eval_shape(_vit().init, jax.random.key(0), IMAGES, TGT)["params"]
    assert shapes["source"]["patch_embedding"]["kernel"].shape == (4, 4, 1, 16)
    assert shapes["source"]["positions"].shape == (PATCHES, 16)  # one per patch
    shapes = jax.eval_shape(_rnn().init, jax.random.key(0), IMAGES, TGT)["params"]
    assert shapes["source"]["conv_0"]["kernel"].shape == (3, 3, 1, 32)
    assert shapes["encoder"]["kernel"].shape == (8, 16)  # patch features -> memory


def test_vit_classifier_keeps_its_parameter_names():
    vit = models.VisionTransformer(3, patch_size=4, options=models.TransformerOptions(width=8))
    shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    assert shapes["patch_embedding"]["kernel"].shape == (4, 4, 1, 8)


@pytest.mark.parametrize(
    "model, match",
    [
        (
            models.EncoderDecoder(5, VOCAB, source=models.PatchEmbedder(128)),
            "'src_vocab_size' must be 0",
        ),
        (
            models.Seq2SeqRNN(5, VOCAB, source=models.PatchEmbedder(64)),
            "'src_vocab_size' must be 0",
        ),
        (models.Seq2SeqRNN(5, VOCAB, encoder_cell="none"), "'bidirectional' must be False"),
        (
            models.EncoderDecoder(0, VOCAB, source=models.PatchEmbedder(128, positions="2d")),
            "'positions' must be one of",
        ),
        (
            models.EncoderDecoder(0, VOCAB, source=models.PatchEmbedder(128, patch_size=3)),
            "not a multiple of patch_size 3",
        ),
    ],
)
def test_bad_sources_name_the_attribute(model, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), IMAGES, TGT)


@pytest.mark.parametrize(
    "model",
    [
        models.EncoderDecoder(0, VOCAB, models.TransformerOptions(width=16), source=_rnn().source),
        models.Seq2SeqRNN(0, VOCAB, embed_dim=16, source=_rnn().source),  # the source gives 8
    ],
)
def test_a_source_of_the_wrong_width_is_refused(model):
    with pytest.raises(AssertionError, match=r"source: expected \[batch, src_len, "):
        jax.eval_shape(model.init, jax.random.key(0), IMAGES, TGT)
