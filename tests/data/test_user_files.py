"""The file tasks (text, pairs, labelled): bad input, windows, metrics, the launcher's exit."""

from __future__ import annotations

import importlib
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.data import text_windows
from attn_jax.data.mqar import IGNORE
from attn_jax.data.vocab import BOS, PAD
from attn_jax.train.sweep import apply_overrides
from attn_jax.train.tasks import build_task, init_params, validate_task
from attn_jax.train.tasks.labelled import class_metrics, label_order
from attn_jax.train.tasks.pairs import pair_metrics
from attn_jax.train.tasks.text import final_eval_fn, loss_fn_for
from attn_jax.train.validate import ConfigError, validate_train_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOOD = {  # small valid files per task
    "text": ("train.txt", "some text to train a model on\n" * 4),
    "pairs": ("train.tsv", "one two\t1 2\nthree\t3\n"),
    "labelled": ("train.jsonl", '{"text": "rain today", "label": "weather"}\n'
                 '{"text": "a goal", "label": "sport"}\n'),
}  # fmt: skip


def _config(task: str, tmp_path: pathlib.Path, **files: bytes | str):
    """The task's quick config on tiny files in ``tmp_path``: ``train`` / ``eval`` give a
    file's name and content as ``"name.ext:content"`` (default: :data:`GOOD`)."""
    config = importlib.import_module(f"configs.{task}").get_config("quick")
    overrides = {"train.batch_size": 1, "data.num_eval": 1}
    for split in ("train", "eval"):
        name, content = GOOD[task]
        if split in files:
            name, content = files[split]
        path = tmp_path / f"{split}_{name}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        overrides[f"data.{split}_files"] = str(path)
    if task == "text":
        overrides["data.seq_len"] = 8
    return apply_overrides(config, overrides)


# (task, split, file name, content, the message after "config.data.SPLIT_files: PATH")
BAD_INPUTS = [
    ("text", "train", "a.txt", b"", ": file is empty"),
    ("text", "eval", "a.txt", b"fine\nfine\n\xe9t\xe9\n",
     ":3: not valid UTF-8 (byte 0xe9 at column 1)"),
    ("pairs", "train", "a.tsv", "a\t1\n\nno tab\n", ":3: no tab between source and target"),
    ("pairs", "eval", "a.tsv", "a\tb\tc\n", ":1: 2 tabs (expected one: source<TAB>target)"),
    ("pairs", "eval", "a.tsv", "\n \n", ": no examples (only blank lines)"),
    ("pairs", "train", "a.tsv", "a\t\n", ":1: empty target"),
    ("labelled", "train", "a.jsonl", '{"text": "x", "label": "a"}\n[1]\n',
     ':2: expected a JSON object with "text" and "label"'),
    ("labelled", "train", "a.jsonl", '{"text": "x"}\n', ':1: missing key "label"'),
    ("labelled", "train", "a.jsonl", '{"text": "x", "label": 1.5}\n',
     ':1: "label" must be a string or an integer, got 1.5'),
    ("labelled", "train", "a.jsonl", '{"text": "x", \n', ":1: not valid JSON (Expecting property "
     "name enclosed in double quotes at column 15)"),
    ("labelled", "eval", "a.csv", "words,label\nx,a\n",
     ":1: the header has no 'text' column (columns: words, label)"),
    ("labelled", "eval", "a.csv", "text,label\nrain,weather\nhi,joy\n",
     ":3: unknown label 'joy' (the training labels: sport, weather)"),
    ("labelled", "eval", "a.csv", "text,label\nrain,weather,extra\n",
     ":2: 3 fields, the header has 2"),
    ("labelled", "eval", "a.csv", 'text,label\n"rain\nall day", weather \n"a\ngoal",cricket\n',
     ":4: unknown label 'cricket' (the training labels: sport, weather)"),  # a record's 1st line
    ("labelled", "eval", "a.tsv", "rain\tweather\n",
     ": unknown format '.tsv'; expected .jsonl or .csv"),
]  # fmt: skip


@pytest.mark.parametrize("task, split, name, content, message", BAD_INPUTS)
def test_bad_input_is_one_error_naming_file_and_line(task, split, name, content, message, tmp_path):
    config = _config(task, tmp_path, **{split: (name, content)})
    with pytest.raises(ConfigError) as error:
        validate_train_config(config, 1)
    path = tmp_path / f"{split}_{name}"
    assert str(error.value) == f"config.data.{split}_files: {path}{message}"


TINY_MODEL = {"model.num_layers": 1, "model.width": 16, "model.mlp_dim": 32, "model.num_heads": 2}
FINAL_KEYS = {
    "text": {"bits_per_byte", "loss", "accuracy", "count"},
    "pairs": {"exact_match", "bleu", "chrf", "count", "examples", "mistakes"},
    "labelled": {"accuracy", "per_class", "class_counts", "confusion", "majority_train_class"},
}


@pytest.mark.parametrize("task", sorted(GOOD))
def test_file_tasks_build_and_evaluate_with_their_models(task, tmp_path):
    config = apply_overrides(_config(task, tmp_path), TINY_MODEL)
    built = build_task(config)
    params = init_params(built, jax.random.key(0))
    batch = built.train.batch(3, 2)
    for key, array in build_task(config).train.batch(3, 2).items():  # rebuilt: same batch
        np.testing.assert_array_equal(array, batch[key])
    final = built.final_eval(params)
    assert FINAL_KEYS[task] <= set(final), sorted(final)
    assert final["count"] == {"text": 120, "pairs": 2, "labelled": 2}[task]


def test_missing_files_and_empty_globs_are_named(tmp_path):
    config = _config("text", tmp_path)
    for spec, what in [
        (f"{tmp_path}/nope.txt", "no such file"),
        (f"{tmp_path}/*.md", "matches no file"),
        (f"{config.data.train_files},{tmp_path}/nope.txt", "no such file"),
    ]:
        with pytest.raises(ValueError) as error:
            validate_task(apply_overrides(config, {"data.eval_files": spec}))
        assert str(error.value) == f"config.data.eval_files: {spec.split(',')[-1]}: {what}"
    labels = r"unknown label 'weather' \(config.data.labels: sport, x\)"
    with pytest.raises(ValueError, match=rf"config.data.train_files: .*train_.*:1: {labels}"):
        validate_task(apply_overrides(_config("labelled", tmp_path), {"data.labels": "sport,x"}))
    (tmp_path / "more.txt").write_text(GOOD["text"][1])
    two = {
        "data.train_files": f"{config.data.train_files},{tmp_path}/more.txt",
        "data.seq_len": 300,
    }
    with pytest.raises(ValueError) as error:  # two files: 2 x 120 bytes and a <bos> each
        validate_task(apply_overrides(config, two))
    assert str(error.value) == (
        "config.data.seq_len: a window needs 301 tokens, but config.data.train_files give 242 "
        "(240 of text and a <bos> before each of the 2 file(s))"
    )


@pytest.mark.parametrize("task", sorted(GOOD))
def test_an_evaluation_file_that_is_also_a_training_file_is_an_error(task, tmp_path):
    config = _config(task, tmp_path)  # train_NAME and eval_NAME in tmp_path
    suffix = GOOD[task][0].split(".")[1]
    train = {"data.train_files": f"{tmp_path}/*.{suffix}"}  # matches the evaluation file too
    with pytest.raises(ValueError) as error:
        validate_task(apply_overrides(config, train))
    assert str(error.value) == (
        f"config.data.eval_files: {config.data.eval_files}: is also a training file "
        "(config.data.train_files names it too)"
    )
    same = f"{tmp_path}/./{pathlib.Path(config.data.eval_files).name}"  # another spelling
    with pytest.raises(ValueError, match=r"config\.data\.eval_files: .* is also a training file"):
        validate_task(apply_overrides(config, {"data.train_files": same}))


def test_windows_are_a_pure_function_of_seed_and_step():
    stream = np.arange(1_000, dtype=np.int32) + 3  # token i + 3 at position i
    a, b = (text_windows.WindowDataset(stream, 16, seed=7) for _ in range(2))
    later, early = a.batch(41, 8), a.batch(3, 8)  # b in the other order: no hidden state
    np.testing.assert_array_equal(early["labels"], b.batch(3, 8)["labels"])
    np.testing.assert_array_equal(later["inputs"], b.batch(41, 8)["inputs"])
    assert not np.array_equal(a.batch(3, 8)["inputs"], a.batch(4, 8)["inputs"])
    other = text_windows.WindowDataset(stream, 16, seed=8)
    assert not np.array_equal(other.batch(3, 8)["inputs"], a.batch(3, 8)["inputs"])
    batch = a.batch(3, 8)  # labels are the next tokens of the stream
    starts = batch["inputs"][:, 0] - 3
    np.testing.assert_array_equal(batch["labels"], stream[starts[:, None] + np.arange(1, 17)])


def test_streams_tiles_and_unknown_characters():
    stream = text_windows.byte_stream([b"ab", "é".encode()])
    np.testing.assert_array_equal(stream, [BOS, 97 + 3, 98 + 3, BOS, 0xC3 + 3, 0xA9 + 3])
    tiles = text_windows.tile_windows(stream, 4)  # 5 targets: one window and a padded one
    np.testing.assert_array_equal(tiles["inputs"], [[BOS, 100, 101, BOS], [198, 172, PAD, PAD]])
    np.testing.assert_array_equal(
        tiles["labels"], [[100, 101, IGNORE, 198], [172, IGNORE, IGNORE, IGNORE]]
    )  # <bos> (a file boundary) and padding are never targets
    tokens = text_windows.char_tokens(["ba", "c"])
    assert tokens == ["<unk>", "a", "b", "c"]
    ids, unknown = text_windows.char_stream(["cab", "zé"], tokens)
    np.testing.assert_array_equal(ids, [BOS, 6, 4, 5, BOS, 3, 3])
    assert unknown == 2


class _Fixed:
    """A stand-in model whose logits ignore the inputs: ``logits[t]`` for every window."""

    def __init__(self, logits: np.ndarray):
        self.logits = jnp.asarray(logits, jnp.float32)

    def apply(self, variables, inputs, **kwargs):
        return jnp.broadcast_to(self.logits, (*inputs.shape, self.logits.shape[-1]))


def test_bits_per_byte_is_the_hand_computed_cross_entropy_in_bits():
    logits = np.log([0.5, 0.25, 0.125, 0.125])  # p(token) for a 4-token vocabulary
    model = _Fixed(logits)
    windows = {  # token 2 twice and token 1 once are scored; the rest is ignored
        "inputs": np.zeros((2, 3), np.int32),
        "labels": np.asarray([[2, IGNORE, 1], [IGNORE, 2, IGNORE]], np.int32),
    }
    bits = (3 + 2 + 3) / 3  # -log2 of 0.125, 0.25, 0.125
    final = final_eval_fn(model, windows, "byte")(None)
    assert final["bits_per_byte"] == pytest.approx(bits, rel=1e-6)
    assert final["loss"] == pytest.approx(bits * math.log(2), rel=1e-6)  # nats
    assert final["count"] == 3 and final["accuracy"] == 0.0  # argmax is token 0
    _, metrics = loss_fn_for(model, "char")(None, windows, None, True)
    assert float(metrics["bits_per_char"]) == pytest.approx(bits, rel=1e-6)
    assert float(metrics["bits_per_char"]) != pytest.approx(float(metrics["loss"]))


def test_accuracy_per_class_and_confusion():
    labels = np.asarray([0, 0, 0, 1, 1, 2])
    predictions = np.asarray([0, 1, 0, 1, 1, 1])
    metrics = class_metrics(predictions, labels, ["a", "b", "c", "d"], majority=0)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.0})  # no "d"
    assert metrics["class_counts"] == {"a": 3, "b": 2, "c": 1}
    assert metrics["majority_train_class"] == 0.5
    assert metrics["confusion"] == {"a": {"a": 2, "b": 1}, "b": {"b": 2}, "c": {"b": 1}}
    # Integer labels: numeric order (fullmatch -?[0-9]+), kept in the per-class entries and
    # the confusion matrix (a string order would put "10" before "2").
    names = label_order({"10", "2", "-1", "b", "--3", "²"})
    assert names == ["-1", "2", "10", "--3", "b", "²"]
    metrics = class_metrics(np.asarray([2, 1, 1]), np.asarray([2, 2, 1]), names, majority=1)
    assert list(metrics["confusion"]) == list(metrics["per_class"]) == ["2", "10"]
    assert list(metrics["confusion"]["10"]) == ["2", "10"]


def test_pair_metrics_compare_tokens_and_bleu():
    targets = [list("312"), list("45"), list("7")]
    outputs = [list("312"), list("46"), list("7")]
    metrics = pair_metrics(outputs, targets, [["s1"], ["s2"], ["s3"]], "char")
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert 0 < metrics["bleu"] < 100 and 0 < metrics["chrf"] < 100
    assert metrics["mistakes"] == [{"source": "s2", "target": "45", "output": "46"}]
    assert pair_metrics(targets, targets, targets, "char")["chrf"] == pytest.approx(100)
    words = [["3", "1", "2"], ["4", "5"]]
    assert pair_metrics(words, words, words, "whitespace")["bleu"] == pytest.approx(100)
    # An unknown output token is not the target's literal text "<unk>" (same detokenised).
    unknown = pair_metrics([["<unk>"]], [list("<unk>")], [["x"]], "char")
    assert unknown["exact_match"] == 0.0 and unknown["mistakes"][0]["output"] == "<unk>"


def test_launch_stops_with_one_line_and_exit_code_2_writing_nothing(tmp_path):
    bad = tmp_path / "eval.csv"
    bad.write_text("text,label\nrain all day,weather\nwhat a goal,cricket\n")
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            f"--config={ROOT}/configs/labelled.py:quick",  # trains on the shipped sample
            f"--config.data.eval_files={bad}",
            f"--workdir={workdir}",
        ],
        capture_output=True,
        text=True,
        cwd="/",  # the sample paths do not depend on the working directory
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: config.data.eval_files: {bad}:3: unknown label 'cricket' "
        "(the training labels: food, music, sport, weather)"
    )
    assert not workdir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["eval.csv"]
