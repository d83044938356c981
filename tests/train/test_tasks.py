"""Every task config's quick variant trains a few steps, evaluates and draws attention."""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest

from attn_jax.data.vocab import Vocabulary
from attn_jax.train.loop import train_and_evaluate
from attn_jax.train.sweep import apply_overrides
from attn_jax.train.tasks import build_task, init_params
from attn_jax.train.tasks.seq2seq import bleu, bucket_metrics, encode_pairs
from attn_jax.train.validate import ConfigError, validate_train_config

# Config file -> overrides that keep a CI run to seconds (fewer examples, tiny batches).
ONE_LAYER = {"model.num_layers": 1}  # Transformers: half the compile time
SMALL = {
    "scan_rnn": {"data.num_test": 24},
    "scan_transformer": {"data.split": "length", "data.num_test": 24, **ONE_LAYER},
    "numbers_rnn": {"data.num_train": 64, "data.num_valid": 16, "data.num_test": 24},
    "numbers_transformer": {
        "data.num_train": 64,
        "data.num_valid": 16,
        "data.num_test": 24,
        **ONE_LAYER,
    },
    "listops": {"data.num_train": 64, "data.num_valid": 16, "data.num_test": 20, **ONE_LAYER},
    "digits_vit": ONE_LAYER,
    "digits_pixels": ONE_LAYER,
    "copy": {"data.num_train": 64, "data.num_final": 12, "data.eval_lengths": [16, 32]},
    "induction": {"data.num_train": 64, "data.num_final": 12, "data.eval_lengths": [32, 64]},
}


# Two steps of batch 8 on one device (the experiment tests reuse these sizes: the
# persistent compilation cache then compiles each program once).
SMOKE = {
    "train.steps": 2,
    "train.batch_size": 8,
    "train.num_devices": 1,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "optim.warmup_steps": 1,
    "data.num_eval": 8,
}


def _quick(name: str, **overrides):
    config = importlib.import_module(f"configs.{name}").get_config("quick")
    return apply_overrides(config, {**SMOKE, **SMALL[name], **overrides})


@pytest.mark.parametrize("name", sorted(SMALL))
def test_quick_config_trains_evaluates_and_plots(name, tmp_path):
    config = _quick(name)
    validate_train_config(config, jax.local_device_count())
    result = train_and_evaluate(config, tmp_path)
    assert result["step"] == 2 and np.isfinite(result["eval"]["loss"])
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final == result["final"]
    if name.startswith(("copy", "induction")):
        lengths = config.data.eval_lengths
        assert set(final) == {
            f"{m}@{n}" for m in ("accuracy", "sequence_accuracy") for n in lengths
        }
    elif name.startswith(("scan", "numbers")):
        assert 0.0 <= final["exact_match"] <= 1.0
        assert sum(b["count"] for b in final["buckets"]) == final["count"]
        assert ("bleu" in final) == name.startswith("numbers")
    else:
        assert 0.0 <= final["accuracy"] <= 1.0
    plots = sorted(p.name for p in (tmp_path / "attention").glob("*.png"))
    assert plots, "no attention heatmaps written"


def test_scan_final_evaluation_decodes_the_whole_test_split_by_default():
    small_model = {"model.embed_dim": 8, "model.hidden_dim": 8, "data.split": "length"}
    task = build_task(_quick("scan_rnn", **small_model, **{"data.num_test": 0}))
    params = init_params(task, jax.random.key(0))
    final = task.final_eval(params)
    assert final["count"] == 3_920
    buckets = {b["bucket"]: b["count"] for b in final["buckets"]}
    assert sum(buckets.values()) == 3_920 and set(buckets) == {"23-32", "33-40", ">40"}


def test_kernels_without_weights_are_plotted_through_the_exact_reference(tmp_path):
    """Exact kernels without weights plot through dot_product; approximate kernels and
    seq2seq models without attention plot nothing."""
    config = _quick("induction", **{"model.attention": "flash"})
    task = build_task(config)
    params = init_params(task, jax.random.key(0))
    paths = task.plot_examples(params, tmp_path)
    assert [p.name for p in paths] == [
        "example_0_layer_0_attention.png",
        "example_0_layer_1_attention.png",
    ]
    windowed = build_task(
        _quick(
            "induction",
            **{
                "model.attention": "sliding_window",
                "model.attention_kwargs": {"local_window_size": (4, 0), "block_size": 8},
            },
        )
    )  # plotted through dot_product with the window, without sliding_window's block size
    assert len(windowed.plot_examples(params, tmp_path / "windowed")) == 2
    approximate = build_task(_quick("induction", **{"model.attention": "linear"}))
    assert approximate.plot_examples(params, tmp_path / "linear") == []
    without_attention = build_task(_quick("numbers_rnn", **{"model.attention": "none"}))
    rnn_params = init_params(without_attention, jax.random.key(0))
    assert without_attention.plot_examples(rnn_params, tmp_path / "none") == []


def test_encode_pairs_shifts_targets_and_pads():
    src_vocab, tgt_vocab = Vocabulary(["a", "b"]), Vocabulary(["X", "Y"])
    arrays = encode_pairs([(["a", "b"], ["Y"]), (["b"], ["X", "Y"])], src_vocab, tgt_vocab, 3, 3)
    np.testing.assert_array_equal(arrays["src"], [[3, 4, 0], [4, 0, 0]])
    np.testing.assert_array_equal(arrays["tgt_in"], [[1, 4, 0], [1, 3, 4]])
    np.testing.assert_array_equal(arrays["tgt_out"], [[4, 2, 0], [3, 4, 2]])


def test_bucket_metrics_split_exact_match_and_bleu_by_length():
    references = [["a"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"], ["x"] * 9]
    hypotheses = [["a"], ["a", "b", "c", "d"], ["a", "b", "c", "x", "e"], ["x"] * 9]
    result = bucket_metrics(hypotheses, references, [1, 4, 5, 9], [2, 5], with_bleu=True)
    assert result["exact_match"] == 0.75 and result["count"] == 4
    assert [(b["bucket"], b["count"], b["exact_match"]) for b in result["buckets"]] == [
        ("1-2", 1, 1.0),
        ("3-5", 2, 0.5),
        (">5", 1, 1.0),
    ]
    assert result["buckets"][0]["bleu"] == pytest.approx(100.0)  # one token: effective order
    assert 0.0 < result["buckets"][1]["bleu"] < 100.0
    assert bleu([["a", "b"]], [["c", "d"]]) == 0.0


@pytest.mark.parametrize(
    "name, key, value, match",
    [
        ("scan_rnn", "data.split", "random", "split: expected one of"),
        ("scan_rnn", "model.name", "gru", "config.model.name: expected one of"),
        ("scan_rnn", "model.attention", "bahdanau", "config.model.attention: unknown kernel"),
        ("scan_rnn", "model.score", "cosine", "config.model.score"),
        ("scan_rnn", "model.attention", "flash", "config.model.attention: 'flash' returns no"),
        ("scan_rnn", "data.num_test", 5_000, "config.data.num_test"),
        ("numbers_rnn", "data.max_digits", 13, "config.data.max_digits"),
        ("numbers_rnn", "data.max_digits", 1, "config.data.num_train \\+ num_valid"),
        ("numbers_transformer", "data.length_buckets", [8, 4], "config.data.length_buckets"),
        ("listops", "data.max_depth", 0, "config.data.max_depth"),
        ("digits_vit", "model.patch_size", 3, "config.model.patch_size"),
        ("digits_pixels", "model.pooling", "max", "config.model.pooling"),
        ("copy", "data.eval_lengths", [], "config.data.eval_lengths"),
        ("induction", "data.seq_len", 2, "config.data.seq_len"),
    ],
)
def test_bad_task_settings_name_the_config_key(name, key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(_quick(name, **{key: value}), 1)


def test_unknown_model_field_is_named():
    config = _quick("digits_vit")
    config.model.heads = 4
    with pytest.raises(ConfigError, match=r"config.model: unknown field\(s\) \['heads'\]"):
        validate_train_config(config, 1)


# Config -> documented batch arrays: name -> (shape after the batch axis, dtype).
BATCHES = {
    "scan_rnn": {"src": (9,), "tgt_in": (49,), "tgt_out": (49,)},
    "numbers_rnn": {"src": None, "tgt_in": None, "tgt_out": None},
    "listops": {"inputs": (128,), "labels": ()},
    "digits_vit": {"inputs": (8, 8, 1), "labels": ()},
    "digits_pixels": {"inputs": (64,), "labels": ()},
    "copy": {"inputs": (34,), "labels": (34,)},
    "induction": {"inputs": (32,), "positions": (1,), "answers": (1,)},
}


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_batches_have_the_documented_shapes(name):
    task = build_task(_quick(name))
    batch = task.train.batch(3, 5)
    assert set(batch) == set(BATCHES[name])
    for key, shape in BATCHES[name].items():
        assert batch[key].shape[0] == 5, key
        if shape is not None:
            assert batch[key].shape[1:] == shape, key
        expected = "float32" if name == "digits_vit" and key == "inputs" else "int32"
        assert batch[key].dtype == expected, key
    np.testing.assert_array_equal(task.train.batch(3, 5)[key], batch[key])  # step-indexed
