"""``labelled``: text classification on the user's own JSONL or CSV files.

Config (``config.data``): ``train_files`` / ``eval_files`` (paths or globs, several
separated by commas; formats in :mod:`attn_jax.data.user_formats`), ``tokenize``
(``"char"`` or ``"whitespace"``), ``labels`` (the classes in order, a list or a
comma-separated string; empty: the sorted labels of the training files), ``max_len``
(tokens kept per text, the rest cut off; 0: the longest text), ``num_eval`` (evaluation
examples scored while training, a fixed random subset, a multiple of the batch size; 0: as
many whole batches as the evaluation files give; they come from the evaluation files, so
the "best" checkpoint is chosen on them, while the final evaluation scores the last
parameters). An evaluation label outside the classes is an error (as is a training label
outside ``labels`` when given); evaluation tokens not in the training files become
``<unk>``.

The model is the :class:`~attn_jax.models.TransformerEncoder` classifier of ListOps
(``config.model.name = "encoder"``, ``config.model.pooling``). The final evaluation
covers every evaluation example: ``accuracy``, ``count``, ``majority_train_class`` (the
accuracy of always answering the most frequent *training* label: a baseline that does not
read the evaluation labels, unlike the ``majority_class`` of ``digits`` and ``listops``),
``per_class`` (accuracy per label present in the evaluation files), ``class_counts`` and
``confusion`` (``{true label: {predicted label: count}}``); all three in class order.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attn_jax.data.user_files import (
    TOKENIZERS,
    DataFileError,
    build_vocabulary,
    file_list,
    split_files,
    with_unknown,
)
from attn_jax.data.user_formats import Labelled, read_labelled
from attn_jax.data.vocab import pad_sequences
from attn_jax.train.tasks import classification
from attn_jax.train.tasks.base import (
    Task,
    TaskDefinition,
    check_fields,
    monitored_count,
    monitored_subset,
    predict_in_batches,
)

__all__ = ["FIELDS", "TASKS", "class_metrics", "label_order"]

FIELDS = ("name", "train_files", "eval_files", "tokenize", "labels", "max_len", "num_eval")
Arrays = dict[str, np.ndarray]


def _integer(label: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", label) is not None


def label_order(labels: set[str]) -> list[str]:
    """Integers (``-?[0-9]+``) in numeric order, then the other labels in string order."""
    numeric = sorted((s for s in labels if _integer(s)), key=lambda s: (int(s), s))
    return numeric + sorted(s for s in labels if not _integer(s))


def class_metrics(
    predictions: np.ndarray, labels: np.ndarray, names: list[str], majority: int
) -> dict[str, Any]:
    """Accuracy overall and per class of ``predictions`` vs ``labels`` (``[n]`` class ids
    into ``names``); ``majority``: the id of the most frequent training label, whose
    constant answer is the baseline ``majority_train_class``. The per-class entries and
    the confusion matrix (``{true: {predicted: count}}``) are in class-id order."""
    right = predictions == labels
    present = [c for c in range(len(names)) if (labels == c).any()]
    pairs = collections.Counter(zip(labels.tolist(), predictions.tolist(), strict=True))
    confusion: dict[str, dict[str, int]] = {}
    for true, predicted in sorted(pairs):
        confusion.setdefault(names[true], {})[names[predicted]] = pairs[true, predicted]
    return {
        "accuracy": float(right.mean()),
        "count": len(right),
        "majority_train_class": float((labels == majority).mean()),
        "per_class": {names[c]: float(right[labels == c].mean()) for c in present},
        "class_counts": {names[c]: int((labels == c).sum()) for c in present},
        "confusion": confusion,
    }


@dataclasses.dataclass
class _Data:
    train: Arrays
    eval: Arrays  # every evaluation example (the final evaluation)
    monitored: np.ndarray  # the indices of those scored while training
    names: list[str]  # class names
    vocab: Any
    unknown: int


def _classes(config: ml_collections.ConfigDict, train: list[Labelled]) -> list[str]:
    given = config.data.get("labels", "")
    names = file_list(given) if isinstance(given, str | list | tuple) else None
    if names is None or len(set(names)) != len(names):
        raise ValueError(f"config.data.labels: expected distinct labels, got {given!r}")
    if not names:
        return label_order({e.label for e in train})
    if len(names) < 2:
        raise ValueError(f"config.data.labels: expected at least two labels, got {names}")
    return names


def _check_labels(examples: list[Labelled], names: list[str], key: str, origin: str) -> None:
    for example in examples:
        if example.label not in names:
            what = f"unknown label {example.label!r} ({origin}: {', '.join(names)})"
            raise DataFileError(key, example.path, what, example.line)


def _read(config: ml_collections.ConfigDict) -> _Data:
    data = config.data
    check_fields(data, FIELDS, "config.data")
    mode = data.get("tokenize", "whitespace")
    if mode not in TOKENIZERS:
        raise ValueError(f"config.data.tokenize: expected one of {TOKENIZERS}, got {mode!r}")
    max_len = data.get("max_len", 0)
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
        raise ValueError(f"config.data.max_len: expected an integer >= 0, got {max_len!r}")
    read = {
        split: read_labelled(files, f"config.data.{split}_files", mode)
        for split, files in split_files(data).items()
    }
    names = _classes(config, read["train"])
    if data.get("labels", ""):
        _check_labels(read["train"], names, "config.data.train_files", "config.data.labels")
    _check_labels(read["eval"], names, "config.data.eval_files", "the training labels")
    if len(names) < 2:
        raise ValueError(f"config.data.train_files: one label only ({names[0]!r})")
    vocab = build_vocabulary(e.tokens for e in read["train"])
    longest = max(len(e.tokens) for split in read.values() for e in split)
    length = min(max_len, longest) if max_len else longest
    unknown, arrays = 0, {}
    for split, examples in read.items():
        rows = []
        for example in examples:
            tokens, unseen = with_unknown(vocab, example.tokens[:length])
            rows.append(vocab.encode(tokens))
            unknown += unseen
        labels = np.asarray([names.index(e.label) for e in examples], np.int32)
        arrays[split] = {"inputs": pad_sequences(rows, length), "labels": labels}
    count = len(read["eval"])
    num_eval = monitored_count(config, count, "examples")
    monitored = monitored_subset(count, num_eval, config.seed)
    return _Data(arrays["train"], arrays["eval"], monitored, names, vocab, unknown)


def _model(config: ml_collections.ConfigDict, data: _Data):
    if config.model.get("name") != "encoder":
        name = config.model.get("name")
        raise ValueError(f"config.model.name: labelled expects 'encoder', got {name!r}")
    length = data.train["inputs"].shape[1]
    return classification.make_encoder(config, len(data.vocab), len(data.names), length)


def _final_eval(model, data: _Data):
    predict = jax.jit(lambda params, x: jnp.argmax(model.apply({"params": params}, x), -1))
    majority = int(np.bincount(data.train["labels"], minlength=len(data.names)).argmax())

    def final_eval(params) -> dict[str, Any]:
        inputs = data.eval["inputs"]
        predictions = predict_in_batches(functools.partial(predict, params), (inputs,))
        metrics = class_metrics(predictions, data.eval["labels"], data.names, majority)
        return {**metrics, "unknown_tokens": data.unknown}

    return final_eval


def _validate(config: ml_collections.ConfigDict) -> None:
    _model(config, _read(config))


def _build(config: ml_collections.ConfigDict) -> Task:
    data = _read(config)
    model = _model(config, data)
    tokens = data.vocab.decode(data.eval["inputs"][0])  # the example plotted
    label = data.names[int(data.eval["labels"][0])]
    return classification.make_task(
        config,
        model,
        data.train,
        {k: v[data.monitored] for k, v in data.eval.items()},
        data.eval,
        classification.with_cls(model, tokens),
        final_eval=_final_eval(model, data),
        title=f"labelled ({model.options.attention}), label {label}:",
    )


TASKS = {"labelled": TaskDefinition(_build, _validate)}
