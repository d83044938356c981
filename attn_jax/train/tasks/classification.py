"""Classification tasks: ListOps (Long Range Arena) and scikit-learn's 8x8 digits.

Models (``config.model.name``): ``"encoder"`` (:class:`~attn_jax.models.TransformerEncoder`
over tokens: ListOps expressions, or a digit's 64 pixels in raster order) and ``"vit"``
(:class:`~attn_jax.models.VisionTransformer` over digit images). ``"accuracy"`` is the
fraction of examples classified right; the final evaluation covers the whole test split:
``accuracy``, ``count``, ``per_class`` and ``majority_class``, the accuracy of always
answering the test split's most frequent label (a baseline that reads the test labels).

``labelled`` reuses :func:`make_encoder`, :func:`make_task` and :func:`with_cls`.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn_jax import models
from attn_jax.data import digits, listops
from attn_jax.data.batching import ArrayDataset
from attn_jax.models.encoder import POOLINGS
from attn_jax.train.tasks.base import (
    Task,
    TaskDefinition,
    for_api,
    linen_model,
    predict_in_batches,
    transformer_options,
)
from attn_jax.train.tasks.plots import plot_layers, sowed_attention, weights_model

__all__ = ["TASKS", "loss_fn_for", "make_encoder", "make_task", "with_cls"]

Arrays = dict[str, np.ndarray]


def loss_fn_for(model) -> Callable:
    """Cross-entropy of ``batch["labels"] [batch]`` given ``batch["inputs"]``:
    ``(params, batch, rng, deterministic) -> (loss, {"loss", "accuracy"})``."""

    def loss_fn(params, batch, rng, deterministic):
        logits = model.apply(
            {"params": params}, batch["inputs"], deterministic=deterministic, rngs={"dropout": rng}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        accuracy = (jnp.argmax(logits, -1) == batch["labels"]).mean()
        return loss, {"loss": loss, "accuracy": accuracy}

    return loss_fn


def _final_eval(model, test: Arrays) -> Callable[[Any], dict[str, Any]]:
    predict = jax.jit(lambda params, x: jnp.argmax(model.apply({"params": params}, x), -1))

    def final_eval(params) -> dict[str, Any]:
        predictions = predict_in_batches(functools.partial(predict, params), (test["inputs"],))
        right = predictions == test["labels"]
        per_class = {
            str(c): float(right[test["labels"] == c].mean()) for c in np.unique(test["labels"])
        }
        majority = float(np.bincount(test["labels"]).max() / len(right))
        return {
            "accuracy": float(right.mean()),
            "count": len(right),
            "majority_class": majority,  # always answering the most frequent test label
            "per_class": per_class,
        }

    return final_eval


def _plot(model, example: np.ndarray, labels: list[str], title: str):
    """Self-attention of every layer on one test example."""

    def plot(params, directory: pathlib.Path) -> list[pathlib.Path]:
        plotted = weights_model(model)
        if plotted is None:
            return []
        layers = sowed_attention(plotted, params, example)
        size = len(labels)
        return plot_layers(
            layers,
            directory,
            "example_0",
            x_labels=labels,
            y_labels=labels,
            title=title,
            trim=(size, size),
        )

    return plot


def make_task(
    config: ml_collections.ConfigDict,
    model,
    train: Arrays,
    eval_: Arrays,
    test: Arrays,
    labels: list[str],
    *,
    final_eval: Callable[[Any], dict[str, Any]] | None = None,
    title: str | None = None,
) -> Task:
    """A classification :class:`Task`: ``train`` / ``eval_`` / ``test`` are ``{"inputs",
    "labels"}`` arrays (``eval_`` scored while training, picking the best checkpoint).

    Args:
      labels: the axis labels of the attention plot of ``test``'s first example (its
        tokens as the model sees them: :func:`with_cls`).
      final_eval: ``params -> metrics``; default: accuracy, per class and the majority
        baseline on ``test``.
      title: the plot's title; default ``"{data.name} ({attention}), label {id}:"``.
    """
    if title is None:
        attention = model.options.attention
        title = f"{config.data.name} ({attention}), label {int(test['labels'][0])}:"
    return Task(
        model=model,
        train=ArrayDataset(train, seed=config.seed),
        eval=ArrayDataset(eval_, seed=config.seed + 1),
        loss_fn=loss_fn_for(model),
        model_inputs=lambda batch: (batch["inputs"],),
        tokens_per_example=int(np.prod(train["inputs"].shape[1:3])),
        final_eval=_final_eval(model, test) if final_eval is None else final_eval,
        plot_examples=_plot(model, test["inputs"][:1], labels, title),
    )


def _check_sizes(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = config.data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.data.{key}: expected a positive integer, got {value!r}")


def make_encoder(
    config: ml_collections.ConfigDict, vocab_size: int, num_classes: int, length: int
) -> models.TransformerEncoder:
    """The :class:`~attn_jax.models.TransformerEncoder` classifier of ``config.model``
    (``pooling``: ``"cls"`` or ``"mean"``) over ``length`` tokens (errors name the key)."""
    pooling = config.model.get("pooling", "cls")
    if pooling not in POOLINGS[:-1]:
        raise ValueError(f"config.model.pooling: expected one of {POOLINGS[:-1]}, got {pooling!r}")
    options = transformer_options(config.model, length + 1, extra=("pooling",))
    return for_api(
        config, models.TransformerEncoder(vocab_size, num_classes, options, pooling=pooling)
    )


def with_cls(model, labels: list[str]) -> list[str]:
    """Token labels as the encoder sees them (a prepended CLS token with ``pooling="cls"``)."""
    return ["[CLS]", *labels] if getattr(model, "pooling", "cls") == "cls" else labels


# --- ListOps ------------------------------------------------------------------------------


def _listops_spec(config: ml_collections.ConfigDict) -> listops.ListOpsConfig:
    data = config.data
    spec = listops.ListOpsConfig(
        max_depth=data.max_depth,
        max_args=data.max_args,
        min_length=data.min_length,
        max_length=data.max_length,
    )
    spec.validate("config.data")
    _check_sizes(config, ("num_train", "num_valid", "num_test", "num_eval"))
    if data.num_eval > data.num_valid:
        raise ValueError(
            f"config.data.num_eval: {data.num_eval} exceeds config.data.num_valid "
            f"({data.num_valid})"
        )
    return spec


def _listops_model(config: ml_collections.ConfigDict):
    spec = _listops_spec(config)
    if config.model.get("name") != "encoder":
        raise ValueError(f"config.model.name: ListOps expects 'encoder', got {config.model.name!r}")
    return make_encoder(config, len(listops.vocabulary()), 10, spec.max_length)


def _build_listops(config: ml_collections.ConfigDict) -> Task:
    spec = _listops_spec(config)
    model = _listops_model(config)
    data = config.data

    def arrays(count: int, seed: int) -> Arrays:
        try:
            expressions, labels = listops.make_listops(spec, count, seed)
        except ValueError as error:  # "data.min_length: ... too unlikely"
            raise ValueError(f"config.{error}") from None
        return {"inputs": listops.encode(expressions, spec.max_length), "labels": labels}

    valid = arrays(data.num_valid, config.seed + 1)
    test = arrays(data.num_test, config.seed + 2)
    vocab = listops.vocabulary()
    length = int((test["inputs"][0] != 0).sum())
    return make_task(
        config,
        model,
        arrays(data.num_train, config.seed),
        {k: v[: data.num_eval] for k, v in valid.items()},
        test,
        with_cls(model, vocab.decode(test["inputs"][0][:length])),
    )


# --- Digits -------------------------------------------------------------------------------


def _digits_model(config: ml_collections.ConfigDict):
    name = config.model.get("name")
    if name == "vit":
        patch = config.model.get("patch_size", 2)
        if not isinstance(patch, int) or patch < 1 or 8 % patch:
            raise ValueError(f"config.model.patch_size: expected 1, 2, 4 or 8, got {patch!r}")
        pooling = config.model.get("pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"config.model.pooling: expected 'cls' or 'mean', got {pooling!r}")
        patches = (8 // patch) ** 2
        options = transformer_options(config.model, patches + 1, extra=("patch_size", "pooling"))
        vit = models.VisionTransformer(digits.NUM_CLASSES, patch, options, pooling=pooling)
        return for_api(config, vit)
    if name == "encoder":
        return make_encoder(config, digits.PIXEL_VOCAB_SIZE, digits.NUM_CLASSES, 64)
    raise ValueError(f"config.model.name: digits expects 'vit' or 'encoder', got {name!r}")


def _validate_digits(config: ml_collections.ConfigDict) -> None:
    fraction = config.data.test_fraction
    if not isinstance(fraction, float) or not 0 < fraction < 1:
        raise ValueError(f"config.data.test_fraction: expected a float in (0, 1), got {fraction!r}")
    _check_sizes(config, ("num_eval",))
    test_size = int(np.ceil(1797 * fraction))
    if config.data.num_eval > test_size:
        raise ValueError(
            f"config.data.num_eval: {config.data.num_eval} exceeds the {test_size} test images"
        )
    _digits_model(config)


def _build_digits(config: ml_collections.ConfigDict) -> Task:
    _validate_digits(config)
    model = _digits_model(config)
    split = digits.load_digits_split(config.seed, config.data.test_fraction)
    if isinstance(linen_model(model), models.VisionTransformer):
        train_inputs, test_inputs = split.train_images, split.test_images
        side = 8 // model.patch_size
        labels = ["cls", *(f"r{r}c{c}" for r in range(side) for c in range(side))]
    else:
        train_inputs = digits.pixel_tokens(split.train_images)
        test_inputs = digits.pixel_tokens(split.test_images)
        labels = with_cls(model, [str(int(t) - digits.PIXEL_OFFSET) for t in test_inputs[0]])
    test = {"inputs": test_inputs, "labels": split.test_labels}
    # Digits has no validation split: training is monitored on part of the test split.
    return make_task(
        config,
        model,
        {"inputs": train_inputs, "labels": split.train_labels},
        {k: v[: config.data.num_eval] for k, v in test.items()},
        test,
        labels,
    )


TASKS = {
    "listops": TaskDefinition(_build_listops, _listops_model),
    "digits": TaskDefinition(_build_digits, _validate_digits),
}
