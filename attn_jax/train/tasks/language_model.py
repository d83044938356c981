"""Decoder-LM tasks: MQAR (recall), copy and induction heads (length generalisation).

Every one trains a :class:`~attn_jax.models.TransformerLM`. Their ``"accuracy"`` is the
fraction of answer tokens predicted right (Zoology's MQAR metric); ``"sequence_accuracy"``
the fraction of examples with every answer right. Copy and induction heads train at
``config.data`` lengths and their final evaluation measures accuracy at each of
``config.data.eval_lengths`` (``accuracy@L``): train short, test long.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn_jax import kernels, models
from attn_jax.data.batching import ArrayDataset
from attn_jax.data.copy_tasks import (
    SEP,
    SYMBOL_OFFSET,
    CopyConfig,
    InductionConfig,
    make_copy,
    make_induction,
)
from attn_jax.data.mqar import IGNORE, MQARConfig, make_mqar
from attn_jax.data.packing import pack
from attn_jax.data.vocab import SPECIALS
from attn_jax.kernels.ring import ORDERINGS, shard_positions
from attn_jax.train.tasks.base import (
    DATA_AXIS,
    SEQ_AXIS,
    SequenceParallelLoss,
    Task,
    TaskDefinition,
    for_api,
    masked_cross_entropy,
    predict_in_batches,
    transformer_options,
)
from attn_jax.train.tasks.plots import plot_layers, sowed_attention, weights_model

__all__ = ["TASKS"]

Arrays = dict[str, np.ndarray]
# config.model.attention_kwargs that ring attention honours in sequence-parallel training.
RING_KWARGS = ("local_window_size", "scale", "precision")


def _forward(model: models.TransformerLM, params, batch, rng, deterministic):
    """Logits, labels and label mask for a batch with either ``positions``/``answers``
    (logits at answer positions only) or ``labels`` (``IGNORE`` where no loss), packed
    (``segment_ids`` / ``token_positions``) or not."""
    kwargs = {"deterministic": deterministic, "rngs": {"dropout": rng}}
    if "segment_ids" in batch:
        kwargs.update(segment_ids=batch["segment_ids"], positions=batch["token_positions"])
    if "positions" in batch:
        logits = model.apply(
            {"params": params}, batch["inputs"], output_positions=batch["positions"], **kwargs
        )
        labels = batch["answers"]
        return logits, labels, jnp.ones(labels.shape, bool)
    logits = model.apply({"params": params}, batch["inputs"], **kwargs)
    return logits, batch["labels"], batch["labels"] != IGNORE


def _loss_fn(model: models.TransformerLM):
    def loss_fn(params, batch, rng, deterministic):
        logits, labels, valid = _forward(model, params, batch, rng, deterministic)
        loss, metrics = masked_cross_entropy(logits, labels, valid)
        metrics["sequence_accuracy"] = metrics["accuracy"]
        if "segment_ids" in batch:  # examples are the segments of the rows
            right = jnp.argmax(logits, -1) == labels
            metrics["sequence_accuracy"] = _example_accuracy(right, valid, batch["segment_ids"])
        metrics["accuracy"] = metrics.pop("token_accuracy")
        return loss, metrics

    return loss_fn


def _example_accuracy(right: jax.Array, valid: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The fraction of packed examples (segments ``1..`` of each row, ``[rows, length]``)
    with a loss whose every valid position is predicted right."""
    rows, length = segment_ids.shape
    index = (jnp.arange(rows)[:, None], segment_ids)
    wrong = jnp.zeros((rows, length + 1), jnp.int32).at[index].add(valid & ~right)
    counted = jnp.zeros((rows, length + 1), jnp.int32).at[index].add(valid)
    examples = counted[:, 1:] > 0
    correct = examples & (wrong[:, 1:] == 0)
    return correct.sum() / jnp.maximum(examples.sum(), 1)


def _packing(config: ml_collections.ConfigDict, length: int) -> int | None:
    """The row length of packed training data (``config.data.pack``), or ``None``; checks
    that the settings fit the task and kernel (errors name the key)."""
    if not config.data.get("pack", False):
        return None
    attention = config.model.attention
    if isinstance(attention, str) and not kernels.capabilities(attention).segments:
        raise ValueError(
            f"config.data.pack: kernel {attention!r} takes no segment ids, so packed examples "
            "would attend to each other; choose an exact kernel (dot_product, flash, ...)"
        )
    if config.train.get("sequence_parallel", 1) > 1:
        raise ValueError(
            "config.data.pack: packed sequences are not supported with sequence parallelism"
        )
    row = config.data.get("pack_length", 0) or length
    if row < length:
        raise ValueError(
            f"config.data.pack_length: {row} is shorter than the training length {length}"
        )
    return row


def _length_generalisation(
    model: models.TransformerLM, lengths: list[int], make: Callable[[int], Arrays]
) -> Callable[[Any], dict[str, Any]]:
    """``params -> {"accuracy@L": ..., "sequence_accuracy@L": ...}`` over ``lengths``."""

    @functools.partial(jax.jit, static_argnums=0)
    def correct(names, params, *arrays):
        batch = dict(zip(names, arrays, strict=True))
        logits, labels, valid = _forward(model, params, batch, jax.random.key(0), True)
        right = (jnp.argmax(logits, -1) == labels) & valid
        return jnp.stack([right.sum(-1), valid.sum(-1)], -1)

    def final_eval(params) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for length in lengths:
            arrays = make(length)
            names = tuple(sorted(arrays))
            counts = predict_in_batches(
                functools.partial(correct, names, params), tuple(arrays[n] for n in names)
            )
            results[f"accuracy@{length}"] = float(counts[:, 0].sum() / counts[:, 1].sum())
            results[f"sequence_accuracy@{length}"] = float(np.mean(counts[:, 0] == counts[:, 1]))
        return results

    return final_eval


def _plot_lm(model: models.TransformerLM, example: Arrays, labels: list[str], title: str):
    """Self-attention of every layer on one example (token labels on both axes)."""

    def plot(params, directory: pathlib.Path) -> list[pathlib.Path]:
        plotted = weights_model(model)
        if plotted is None:
            return []
        layers = sowed_attention(plotted, params, example["inputs"][:1])
        return plot_layers(
            layers, directory, "example_0", x_labels=labels, y_labels=labels, title=title
        )

    return plot


def _sequence_parallel_ordering(config: ml_collections.ConfigDict, length: int) -> str | None:
    """``config.train.sequence_ordering`` when ``config.train.sequence_parallel > 1`` (else
    ``None``), the settings checked against the task."""
    degree = config.train.get("sequence_parallel", 1)
    ordering = config.train.get("sequence_ordering", "striped")
    if degree > 1:
        if length % degree:
            raise ValueError(
                f"config.train.sequence_parallel: {degree} does not divide the sequence "
                f"length {length}"
            )
        if ordering not in ORDERINGS:
            raise ValueError(
                f"config.train.sequence_ordering: expected one of {ORDERINGS}, got {ordering!r}"
            )
        extra = sorted(set(config.model.get("attention_kwargs") or {}) - set(RING_KWARGS))
        if extra:
            raise ValueError(
                f"config.model.attention_kwargs: {extra} have no meaning for the ring "
                f"attention that sequence parallelism trains with (it takes {RING_KWARGS})"
            )
        if config.model.get("attention_dropout_rate", 0.0):
            raise ValueError(
                "config.model.attention_dropout_rate: ring attention (sequence parallelism) "
                "does no attention dropout; set it to 0"
            )
        if not kernels.capabilities(config.model.attention).exact:
            raise ValueError(
                "config.model.attention: sequence parallelism (config.train."
                f"sequence_parallel={degree}) trains with ring attention, which computes "
                f"exact softmax attention; {config.model.attention!r} is approximate"
            )
    return ordering if degree > 1 else None


def _with_labels(arrays: Arrays) -> Arrays:
    """``inputs`` and per-token ``labels`` (``IGNORE`` where no loss), also for tasks whose
    answers come as ``positions`` / ``answers``."""
    if "labels" in arrays:
        return {"inputs": arrays["inputs"], "labels": arrays["labels"]}
    labels = np.full(arrays["inputs"].shape, IGNORE, np.int32)
    np.put_along_axis(labels, arrays["positions"], arrays["answers"], axis=1)
    return {"inputs": arrays["inputs"], "labels": labels}


def _sequence_parallel_loss(model: models.TransformerLM, ordering: str) -> SequenceParallelLoss:
    """Per-token cross-entropy on this device's ``[batch / data, length / seq]`` shard of
    ``inputs`` / ``labels``, with ring attention across the ``seq`` axis in every layer
    and positions offset by the shard's place in the sequence. (``model``'s own exact
    kernel, which computes the same function, serves evaluation and decoding.)"""
    options = model.options
    kwargs = {k: v for k, v in (options.attention_kwargs or {}).items() if k in RING_KWARGS}
    kwargs.update(axis_name=SEQ_AXIS, ordering=ordering)
    sharded = model.clone(
        options=dataclasses.replace(options, attention="ring", attention_kwargs=kwargs)
    )
    axes = (DATA_AXIS, SEQ_AXIS)

    def loss_fn(params, batch, rng, deterministic):
        inputs, labels = batch["inputs"], batch["labels"]
        me, devices = jax.lax.axis_index(SEQ_AXIS), jax.lax.axis_size(SEQ_AXIS)
        positions = shard_positions(ordering, me, inputs.shape[1], devices)[None, :]
        logits = sharded.apply(
            {"params": params},
            inputs,
            positions=positions,
            deterministic=deterministic,
            rngs={"dropout": rng},
        )
        valid = labels != IGNORE
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        ce = jnp.where(valid, ce, 0.0)
        count = jnp.maximum(jax.lax.psum(valid.sum(), axes), 1)
        right = (jnp.argmax(logits, -1) == labels) & valid
        wrong = jax.lax.psum((valid & ~right).sum(-1), SEQ_AXIS)  # per example
        examples = jax.lax.psum(inputs.shape[0], DATA_AXIS)
        metrics = {
            "loss": jax.lax.psum(ce.sum(), axes) / count,
            "accuracy": jax.lax.psum(right.sum(), axes) / count,
            "sequence_accuracy": jax.lax.psum((wrong == 0).sum(), DATA_AXIS) / examples,
        }
        return ce.sum() / count, metrics

    return SequenceParallelLoss(loss_fn, ("inputs", "labels"), ordering)


def _lm_task(
    config: ml_collections.ConfigDict,
    model: models.TransformerLM,
    train: Arrays,
    eval_: Arrays,
    token_names: Callable[[np.ndarray], list[str]],
    final_eval: Callable[[Any], dict[str, Any]] | None = None,
) -> Task:
    example = {k: v[:1] for k, v in eval_.items()}
    sequence_parallel = None
    ordering = _sequence_parallel_ordering(config, train["inputs"].shape[1])
    if ordering is not None:
        train, eval_ = _with_labels(train), _with_labels(eval_)
        sequence_parallel = _sequence_parallel_loss(model, ordering)
    row = _packing(config, train["inputs"].shape[1])
    if row is not None:
        train = _with_labels(train)
        train = pack(train["inputs"], train["labels"], row)
    return Task(
        model=model,
        train=ArrayDataset(train, seed=config.seed),
        eval=ArrayDataset(eval_, seed=config.seed + 1),
        loss_fn=_loss_fn(model),
        model_inputs=lambda batch: (batch["inputs"],),
        tokens_per_example=train["inputs"].shape[1],
        final_eval=final_eval,
        plot_examples=_plot_lm(
            model,
            example,
            token_names(example["inputs"][0]),
            f"{config.data.name} ({model.options.attention})",
        ),
        sequence_parallel=sequence_parallel,
    )


# --- MQAR ---------------------------------------------------------------------------------


def _mqar_spec(config: ml_collections.ConfigDict) -> MQARConfig:
    data = config.data
    spec = MQARConfig(
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        num_kv_pairs=data.num_kv_pairs,
        power_a=data.get("power_a", 0.01),
    )
    spec.validate("config.data")
    return spec


def _validate_mqar(config: ml_collections.ConfigDict) -> None:
    seq_len = _mqar_spec(config).seq_len
    transformer_options(config.model, max(seq_len, config.data.get("pack_length", 0)))
    _sequence_parallel_ordering(config, seq_len)
    _packing(config, seq_len)


def _build_mqar(config: ml_collections.ConfigDict) -> Task:
    spec = _mqar_spec(config)

    def arrays(num_examples: int, seed: int) -> Arrays:
        inputs, labels = make_mqar(spec, num_examples, seed)
        # Exactly num_kv_pairs answers per example: gather their positions once.
        positions = np.argsort(labels == IGNORE, axis=1, kind="stable")[:, : spec.num_kv_pairs]
        answers = np.take_along_axis(labels, positions, axis=1)
        return {"inputs": inputs, "positions": positions.astype(np.int32), "answers": answers}

    max_len = max(spec.seq_len, config.data.get("pack_length", 0))
    model = for_api(
        config, models.TransformerLM(spec.vocab_size, transformer_options(config.model, max_len))
    )
    return _lm_task(
        config,
        model,
        arrays(config.data.num_train, config.seed),
        arrays(config.data.num_eval, config.seed + 1),
        lambda tokens: [str(int(t)) for t in tokens],
    )


# --- Copy and induction heads -------------------------------------------------------------


def _symbol_names(marker: str) -> Callable[[np.ndarray], list[str]]:
    """Readable token labels: specials, ``marker`` for token 3 (copy's ``SEP``, induction's
    ``TRIGGER``) and letters for symbols."""

    def name(t: int) -> str:
        if t < len(SPECIALS):
            return SPECIALS[t]
        if t == SEP:
            return marker
        s = t - SYMBOL_OFFSET
        return chr(ord("a") + s) if s < 26 else f"s{s}"

    return lambda tokens: [name(int(t)) for t in tokens]


def _eval_lengths(config: ml_collections.ConfigDict) -> list[int]:
    lengths = list(config.data.eval_lengths)
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"config.data.eval_lengths: expected positive integers, got {lengths!r}")
    return lengths


def _copy_spec(config: ml_collections.ConfigDict) -> CopyConfig:
    data = config.data
    spec = CopyConfig(num_symbols=data.num_symbols, min_len=data.min_len, max_len=data.max_len)
    spec.validate("config.data")
    return spec


def _copy_options(config: ml_collections.ConfigDict) -> models.TransformerOptions:
    longest = max([_copy_spec(config).max_len, *_eval_lengths(config)])
    train_length = 2 * _copy_spec(config).max_len + 2
    _sequence_parallel_ordering(config, train_length)
    row = _packing(config, train_length) or 0
    return transformer_options(config.model, max(2 * longest + 2, row))


def _build_copy(config: ml_collections.ConfigDict) -> Task:
    spec = _copy_spec(config)
    model = for_api(config, models.TransformerLM(spec.vocab_size, _copy_options(config)))
    final_seed = config.seed + 2
    make = functools.partial(make_copy, spec, config.data.num_final, final_seed)
    return _lm_task(
        config,
        model,
        make_copy(spec, config.data.num_train, config.seed),
        make_copy(spec, config.data.num_eval, config.seed + 1),
        _symbol_names("SEP"),
        _length_generalisation(model, _eval_lengths(config), lambda n: make(length=n)),
    )


def _induction_spec(config: ml_collections.ConfigDict) -> InductionConfig:
    spec = InductionConfig(num_symbols=config.data.num_symbols, seq_len=config.data.seq_len)
    spec.validate("config.data")
    return spec


def _induction_options(config: ml_collections.ConfigDict) -> models.TransformerOptions:
    longest = max([_induction_spec(config).seq_len, *_eval_lengths(config)])
    _sequence_parallel_ordering(config, _induction_spec(config).seq_len)
    row = _packing(config, _induction_spec(config).seq_len) or 0
    return transformer_options(config.model, max(longest, row))


def _build_induction(config: ml_collections.ConfigDict) -> Task:
    spec = _induction_spec(config)
    model = for_api(config, models.TransformerLM(spec.vocab_size, _induction_options(config)))
    make = functools.partial(make_induction, spec, config.data.num_final, config.seed + 2)
    return _lm_task(
        config,
        model,
        make_induction(spec, config.data.num_train, config.seed),
        make_induction(spec, config.data.num_eval, config.seed + 1),
        _symbol_names("TRIG"),
        _length_generalisation(model, _eval_lengths(config), lambda n: make(seq_len=n)),
    )


TASKS = {
    "mqar": TaskDefinition(_build_mqar, _validate_mqar, sequence_parallel=True),
    "copy": TaskDefinition(_build_copy, _copy_options, sequence_parallel=True),
    "induction": TaskDefinition(_build_induction, _induction_options, sequence_parallel=True),
}
