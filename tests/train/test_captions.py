"""The digit-captions task: metrics on hand-made captions, a tiny build + final evaluation +
overlay pictures for both models, and config errors naming the key."""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest

from attn_jax.data import digit_strips
from attn_jax.train.sweep import apply_overrides
from attn_jax.train.tasks import build_task, init_params
from attn_jax.train.tasks.captions import caption_metrics, strip_arrays, word_accuracy
from attn_jax.train.validate import ConfigError, validate_train_config

TINY = {
    "data.num_train": 32,
    "data.num_test": 8,
    "data.num_eval": 8,
    "data.beam_size": 2,
    "data.num_plotted": 1,
    "train.batch_size": 8,
    "train.num_devices": 1,
}
TINY_MODEL = {
    "digit_captions_vit": {
        "model.width": 16,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.mlp_dim": 32,
    },
    "digit_captions_rnn": {"model.embed_dim": 8, "model.hidden_dim": 16},
}


def _config(name: str = "digit_captions_vit", **overrides):
    config = importlib.import_module(f"configs.{name}").get_config("quick")
    return apply_overrides(config, {**TINY, **TINY_MODEL[name], **overrides})


def test_word_accuracy_counts_missing_and_extra_words_as_wrong():
    references = [["one", "two", "three"], ["four", "five", "six"], ["seven", "eight", "nine"]]
    hypotheses = [["one", "two", "three"], ["four", "five"], ["seven", "nine", "eight", "zero"]]
    # 3 of 3, 2 of 3 (one missing), 1 of 4 (two swapped, one extra).
    assert word_accuracy(hypotheses, references) == pytest.approx(6 / 10)
    result = caption_metrics(hypotheses, references, [3, 3, 4])
    assert result["count"] == 3 and result["exact_match"] == pytest.approx(1 / 3)
    assert result["by_length"]["3"]["word_accuracy"] == pytest.approx(5 / 6)
    four = result["by_length"]["4"]
    assert (four["count"], four["exact_match"], four["word_accuracy"]) == (1, 0.0, 0.25)
    assert 0.0 < four["bleu"] < 100.0  # the unigrams match (sacrebleu, effective order)
    assert caption_metrics(references, references, [3, 3, 3])["bleu"] == pytest.approx(100.0)
    json.dumps(result)


def test_strip_arrays_shift_the_captions():
    strips = digit_strips.make_strips(
        np.zeros((2, 8, 8)), np.array([7, 2]), 3, min_digits=1, max_digits=2,
        canvas_digits=3, seed=0,
    )  # fmt: skip
    arrays = strip_arrays(strips, 4)
    assert arrays["src"].shape == (3, 8, 24)
    for row, digits in enumerate(strips.digits):
        words = [3 + d for d in digits if d >= 0]
        np.testing.assert_array_equal(arrays["tgt_in"][row, : len(words) + 1], [1, *words])
        np.testing.assert_array_equal(arrays["tgt_out"][row, : len(words) + 1], [*words, 2])


def _check_final(final: dict, count: int) -> None:
    for metrics in (final, final["beam"]):
        assert set(metrics["by_length"]) <= {"3", "4", "5", "6"}
        assert sum(m["count"] for m in metrics["by_length"].values()) == count
        for key in ("exact_match", "word_accuracy"):
            assert 0.0 <= metrics[key] <= 1.0
        assert 0.0 <= metrics["bleu"] <= 100.0
    assert final["beam"]["beam_size"] == 2
    json.dumps(final)


@pytest.mark.parametrize("name", ["digit_captions_vit", "digit_captions_rnn"])
def test_final_evaluation_covers_every_length_and_pictures_overlay_the_strip(name, tmp_path):
    """At random init (the training loop is the same for every task: tests/train)."""
    config = _config(name)
    validate_train_config(config, jax.local_device_count())
    task = build_task(config)
    params = init_params(task, jax.random.key(0))
    final = task.final_eval(params)
    assert final["count"] == 8
    _check_final(final, 8)
    paths = task.plot_examples(params, tmp_path)
    names = sorted(p.name for p in paths)
    if name == "digit_captions_vit":  # one overlay and one matrix per decoder layer
        assert names == [
            "example_0_decoder_layer_0_cross_attention.png",
            "example_0_overlay_decoder_layer_0_cross_attention.png",
        ]
        loss, metrics = jax.jit(task.loss_fn, static_argnums=3)(
            params, task.train.batch(0, 8), jax.random.key(1), False
        )
        assert np.isfinite(loss) and set(metrics) == {"loss", "token_accuracy", "accuracy"}
    else:
        assert names == ["example_0_alignment.png", "example_0_overlay_alignment.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_batches_are_pixels_and_shifted_captions():
    task = build_task(_config())
    batch = task.train.batch(3, 5)
    assert batch["src"].shape == (5, 8, 48) and batch["src"].dtype == np.float32
    assert batch["tgt_in"].shape == batch["tgt_out"].shape == (5, 7)
    assert (batch["tgt_in"][:, 0] == 1).all()
    # Training is monitored on validation strips of held-out train images, not test strips.
    strips = digit_strips.make_digit_strips(
        32, 8, seed=0, num_valid=8, train_lengths=(3, 5), test_lengths=(3, 6)
    )
    np.testing.assert_array_equal(task.eval.arrays["src"], strips["valid"].images)
    assert len(task.eval) == 8 and set(strips["valid"].lengths.tolist()) <= {3, 4, 5}


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.max_train_digits", 7, "config.data.min_digits / max_train_digits"),
        ("data.valid_fraction", 1.0, "config.data.valid_fraction: expected a float in"),
        ("data.beam_size", 0, "config.data.beam_size"),
        ("model.patch_size", 3, "config.model.patch_size"),
        ("model.patch_positions", "2d", "config.model.patch_positions"),
        (
            "model.patch_positions",
            "none",
            "config.model.patch_positions: 'none' leaves the "
            "encoder without positions \\(config.model.positions='sinusoidal'",
        ),
        ("model.name", "vit", "config.model.name: expected one of"),
    ],
)
def test_bad_settings_name_the_config_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(_config(**{key: value}), 1)


def test_bad_rnn_settings_name_the_config_key():
    config = _config("digit_captions_rnn", **{"model.bidirectional": True})
    with pytest.raises(ConfigError, match=r"config\.model\.bidirectional"):
        validate_train_config(config, 1)
    config = _config("digit_captions_rnn", **{"model.patch_positions": "none"})
    with pytest.raises(ConfigError, match=r"patch_positions: 'none' .*encoder_cell='none'"):
        validate_train_config(config, 1)
    lstm = {"model.patch_positions": "none", "model.encoder_cell": "lstm"}
    validate_train_config(_config("digit_captions_rnn", **lstm), 1)  # the LSTM orders them
    rope = {"model.patch_positions": "none", "model.positions": "rope"}
    validate_train_config(_config(**rope), 1)  # so does RoPE in the ViT
