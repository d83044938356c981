"""``text``: a byte- or character-level language model on the user's own UTF-8 text files.

Config (``config.data``): ``train_files`` / ``eval_files`` (paths or globs, several
separated by commas), ``level`` (``"byte"`` or ``"char"``), ``seq_len`` (tokens per
training window), ``num_eval`` (evaluation windows scored while training, a multiple of
the batch size; 0: as many whole batches of windows as the evaluation files give; they
are the evaluation files' first windows, so the "best" checkpoint is chosen on them, while
the final evaluation scores the last parameters). The model is a
:class:`~attn_jax.models.TransformerLM` (``config.model`` as for the other LMs).

Metrics: ``bits_per_byte`` (or ``bits_per_char``) = the mean next-token cross-entropy in
nats / ln 2, next-token ``accuracy`` and ``loss``; the final evaluation scores every token
of the evaluation files once (non-overlapping windows) and also reports ``count`` (tokens
scored) and, at character level, ``unknown`` (evaluation characters not in the training
files, scored as ``<unk>``). See :mod:`attn_jax.data.text_windows` for the streams.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn_jax import models
from attn_jax.data import text_windows
from attn_jax.data.batching import ArrayDataset
from attn_jax.data.mqar import IGNORE
from attn_jax.data.user_files import decode_utf8, read_bytes, split_files
from attn_jax.data.vocab import BOS, SPECIALS
from attn_jax.train.tasks.base import (
    Task,
    TaskDefinition,
    check_fields,
    for_api,
    masked_cross_entropy,
    monitored_count,
    predict_in_batches,
    transformer_options,
)
from attn_jax.train.tasks.plots import plot_layers, sowed_attention, weights_model

__all__ = ["FIELDS", "TASKS", "final_eval_fn", "loss_fn_for", "metric_name"]

FIELDS = ("name", "train_files", "eval_files", "level", "seq_len", "num_eval")
LN2 = math.log(2.0)


@dataclasses.dataclass
class _Text:
    train: np.ndarray  # token streams
    eval: np.ndarray
    vocab_size: int
    names: list[str]  # a readable name per token id
    unknown: int  # character level: evaluation characters outside the vocabulary


def metric_name(level: str) -> str:
    """``"bits_per_byte"`` or ``"bits_per_char"``."""
    return f"bits_per_{level}"


def _read(config: ml_collections.ConfigDict) -> _Text:
    data = config.data
    check_fields(data, FIELDS, "config.data")
    level = data.get("level", "byte")
    if level not in text_windows.LEVELS:
        raise ValueError(f"config.data.level: expected one of {text_windows.LEVELS}, got {level!r}")
    documents = {}
    for split, files in split_files(data).items():
        key = f"config.data.{split}_files"
        raw = [(p, read_bytes(p, key)) for p in files]
        documents[split] = [(p, b, decode_utf8(b, p, key)) for p, b in raw]  # checks UTF-8
    if level == "byte":
        streams = {s: text_windows.byte_stream([b for _, b, _ in d]) for s, d in documents.items()}
        tokens = [chr(b) if b < 128 else f"\\x{b:02x}" for b in range(256)]
        unknown = 0
    else:
        texts = {split: [t for _, _, t in docs] for split, docs in documents.items()}
        tokens = text_windows.char_tokens(texts["train"])
        streams = {"train": text_windows.char_stream(texts["train"], tokens)[0]}
        streams["eval"], unknown = text_windows.char_stream(texts["eval"], tokens)
    names = [*SPECIALS, *(text_windows.token_name(t) for t in tokens)]
    return _Text(streams["train"], streams["eval"], len(names), names, unknown)


def _seq_len(config: ml_collections.ConfigDict, text: _Text) -> int:
    seq_len = config.data.get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"config.data.seq_len: expected a positive integer, got {seq_len!r}")
    if len(text.train) < seq_len + 1:
        files = int((text.train == BOS).sum())
        raise ValueError(
            f"config.data.seq_len: a window needs {seq_len + 1} tokens, but config.data."
            f"train_files give {len(text.train)} ({len(text.train) - files} of text and a "
            f"<bos> before each of the {files} file(s))"
        )
    return seq_len


def _eval_windows(config: ml_collections.ConfigDict, text: _Text, seq_len: int) -> dict:
    """The whole windows of the evaluation stream scored while training."""
    windows = text_windows.tile_windows(text.eval, seq_len)
    whole = len(text.eval) - 1 == len(windows["inputs"]) * seq_len
    available = len(windows["inputs"]) - (not whole)
    what = f"whole windows of {seq_len} tokens (config.data.seq_len)"
    wanted = monitored_count(config, available, what)
    return {k: v[:wanted] for k, v in windows.items()}


def loss_fn_for(model: Any, level: str) -> Callable:
    """``(params, batch, rng, deterministic) -> (loss, metrics)`` of next-token prediction.

    ``batch``: ``inputs`` / ``labels`` ``[batch, seq_len]`` (``IGNORE``: no loss). Metrics:
    ``loss`` (nats per token), ``accuracy`` (next token), ``bits_per_{level}``.
    """
    name = metric_name(level)

    def loss_fn(params, batch, rng, deterministic):
        logits = model.apply(
            {"params": params}, batch["inputs"], deterministic=deterministic, rngs={"dropout": rng}
        )
        loss, metrics = masked_cross_entropy(logits, batch["labels"], batch["labels"] != IGNORE)
        return loss, {"loss": loss, "accuracy": metrics["token_accuracy"], name: loss / LN2}

    return loss_fn


def final_eval_fn(
    model: Any, windows: dict[str, np.ndarray], level: str, extra: dict[str, Any] | None = None
) -> Callable[[Any], dict[str, Any]]:
    """``params -> {"bits_per_{level}", "loss", "accuracy", "count", **extra}`` summed over
    every scored token of ``windows`` (``inputs`` / ``labels`` ``[n, seq_len]``)."""

    @jax.jit
    def sums(params, inputs, labels):
        logits = model.apply({"params": params}, inputs)
        valid = labels != IGNORE
        nats = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        right = (jnp.argmax(logits, -1) == labels) & valid
        rows = [jnp.where(valid, nats, 0.0).sum(-1), valid.sum(-1), right.sum(-1)]
        return jnp.stack([r.astype(jnp.float32) for r in rows], -1)

    def final_eval(params) -> dict[str, Any]:
        rows = predict_in_batches(
            functools.partial(sums, params), (windows["inputs"], windows["labels"]), 64
        )
        nats, count, right = rows.astype(np.float64).sum(0)
        loss = float(nats / count)
        return {
            metric_name(level): loss / LN2,
            "loss": loss,
            "accuracy": float(right / count),
            "count": int(count),
            **(extra or {}),
        }

    return final_eval


def _plot(model, example: np.ndarray, names: list[str], title: str):
    """Self-attention of every layer on the first evaluation window."""
    labels = [names[int(t)] for t in example[0]]

    def plot(params, directory: pathlib.Path) -> list[pathlib.Path]:
        plotted = weights_model(model)
        if plotted is None:
            return []
        layers = sowed_attention(plotted, params, example)
        return plot_layers(
            layers, directory, "example_0", x_labels=labels, y_labels=labels, title=title
        )

    return plot


def _model(config: ml_collections.ConfigDict, text: _Text, seq_len: int):
    return for_api(
        config, models.TransformerLM(text.vocab_size, transformer_options(config.model, seq_len))
    )


def _validate(config: ml_collections.ConfigDict) -> None:
    text = _read(config)
    seq_len = _seq_len(config, text)
    _eval_windows(config, text, seq_len)
    _model(config, text, seq_len)


def _build(config: ml_collections.ConfigDict) -> Task:
    text = _read(config)
    seq_len = _seq_len(config, text)
    level = config.data.get("level", "byte")
    model = _model(config, text, seq_len)
    eval_windows = _eval_windows(config, text, seq_len)
    extra = {"unknown": text.unknown} if level == "char" else {}
    return Task(
        model=model,
        train=text_windows.WindowDataset(text.train, seq_len, seed=config.seed),
        eval=ArrayDataset(eval_windows, seed=config.seed + 1),
        loss_fn=loss_fn_for(model, level),
        model_inputs=lambda batch: (batch["inputs"],),
        tokens_per_example=seq_len,
        final_eval=final_eval_fn(
            model, text_windows.tile_windows(text.eval, seq_len), level, extra
        ),
        plot_examples=_plot(
            model,
            eval_windows["inputs"][:1],
            text.names,
            f"text, {level} level ({model.options.attention})",
        ),
    )


TASKS = {"text": TaskDefinition(_build, _validate)}
