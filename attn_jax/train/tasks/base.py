"""What every task gives the training loop, and model construction from ``config.model``."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attn_jax import kernels, models
from attn_jax.data.batching import ArrayDataset
from attn_jax.models.blocks import check_options

__all__ = [
    "DATA_AXIS",
    "SEQ_AXIS",
    "LossFn",
    "SequenceParallelLoss",
    "StepDataset",
    "Task",
    "TaskDefinition",
    "check_fields",
    "for_api",
    "linen_model",
    "masked_cross_entropy",
    "model_fields",
    "monitored_count",
    "monitored_subset",
    "predict_in_batches",
    "transformer_options",
    "weights_kernel",
]

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
DATA_AXIS, SEQ_AXIS = "data", "seq"  # the mesh axes of sequence-parallel training


@dataclasses.dataclass(frozen=True)
class SequenceParallelLoss:
    """A task's loss for data x sequence parallel training (inside ``shard_map``).

    Attributes:
      loss_fn: ``(params, local batch, rng, deterministic) -> (loss, metrics)``: this
        device's share of the global loss (normalised by the global count, so the summed
        gradients are the global gradient) and global metrics.
      sequence_keys: the batch arrays split along their second (sequence) axis too.
      ordering: how positions are dealt to the devices, ``"contiguous"`` or ``"striped"``
        (device ``d`` of ``P`` holds positions ``d, d + P, ...``: balanced causal work).
    """

    loss_fn: LossFn
    sequence_keys: tuple[str, ...]
    ordering: str = "contiguous"


class StepDataset(Protocol):
    """Training data other than an :class:`ArrayDataset` (e.g. random windows of a text):
    ``batch(step, batch_size)`` must be a pure function of the seed and ``step``."""

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class Task:
    """What the training loop needs to know about a task.

    Attributes:
      model: the Flax module.
      train / eval: step-indexed datasets of numpy arrays (``eval`` is evaluated every
        ``config.train.eval_every`` steps; its size is a multiple of the batch size);
        ``train`` may be any :class:`StepDataset`.
      loss_fn: ``(params, batch, rng, deterministic) -> (loss, metrics)`` with scalar
        metrics (``"accuracy"`` is the evaluation metric that picks the best checkpoint).
      model_inputs: ``batch -> (positional model arguments)`` (used to initialise).
      tokens_per_example: for throughput reporting.
      final_eval: ``params -> metrics``: the task's full evaluation once training ends
        (e.g. greedy decoding on the whole test set, BLEU, accuracy at longer lengths);
        returns a JSON-able dict whose scalar entries are the headline numbers.
      plot_examples: ``(params, directory) -> written PNG paths``: attention heatmaps of a
        few evaluation examples.
      sequence_parallel: the loss for ``config.train.sequence_parallel > 1`` (decoder LM
        tasks), or ``None``.
    """

    model: nn.Module
    train: ArrayDataset | StepDataset
    eval: ArrayDataset
    loss_fn: LossFn
    model_inputs: Callable[[dict[str, np.ndarray]], tuple]
    tokens_per_example: int
    final_eval: Callable[[Any], dict[str, Any]] | None = None
    plot_examples: Callable[[Any, pathlib.Path], list[pathlib.Path]] | None = None
    sequence_parallel: SequenceParallelLoss | None = None

    def init_batch(self, batch_size: int = 2) -> dict[str, np.ndarray]:
        return self.train.batch(0, batch_size)


@dataclasses.dataclass(frozen=True)
class TaskDefinition:
    """A registered task: ``validate(config)`` raises ``ValueError`` naming the config key
    (its return value is ignored; it may generate the data, which takes under a second);
    ``build(config)`` makes the :class:`Task`."""

    build: Callable[[ml_collections.ConfigDict], Task]
    validate: Callable[[ml_collections.ConfigDict], Any]
    sequence_parallel: bool = False  # supports config.train.sequence_parallel > 1


# config.data fields every task has: read by the training pipeline, not the task.
PIPELINE_FIELDS = ("workers",)
# config.model fields every model has: which Flax API builds it (``for_api``).
MODEL_API_FIELDS = ("api",)
MODEL_APIS = ("linen", "nnx")


def check_fields(
    node: ml_collections.ConfigDict, allowed: Iterable[str], prefix: str
) -> dict[str, Any]:
    """``node`` as a dict, raising ``ValueError`` for keys outside ``allowed`` (for
    ``config.data``, the training pipeline's own fields are allowed too)."""
    if prefix == "config.data":
        allowed = {*allowed, *PIPELINE_FIELDS}
    if prefix == "config.model":
        allowed = {*allowed, *MODEL_API_FIELDS}
    values = dict(node.items())
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{prefix}: unknown field(s) {unknown}; known: {sorted(allowed)}")
    return values


def model_fields(
    model: ml_collections.ConfigDict, cls: type, exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """Keyword arguments for the Flax module class ``cls`` from ``config.model`` (without
    ``name``); keys that are not attributes of ``cls``, or are in ``exclude`` (those the
    task sets itself), raise ``ValueError``."""
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", *exclude}
    values = check_fields(model, {*known, "name"}, "config.model")
    values.pop("name", None)
    for key in MODEL_API_FIELDS:
        values.pop(key, None)
    for key in ("dtype", "param_dtype"):
        if key in values:
            values[key] = jnp.dtype(values[key])
    return values


def transformer_options(
    model: ml_collections.ConfigDict, max_len: int, extra: Iterable[str] = ()
) -> models.TransformerOptions:
    """``TransformerOptions`` from ``config.model``, checked (errors name the key).

    ``max_len`` is the default of ``options.max_len``; ``extra`` names model-specific keys
    (such as ``pooling``) that may also appear in ``config.model``: the caller reads them.
    Any other unknown key is an error.
    """
    fields = {f.name for f in dataclasses.fields(models.TransformerOptions)}
    values = check_fields(model, {*fields, *extra, "name"}, "config.model")
    values = {k: v for k, v in values.items() if k in fields}
    values.setdefault("max_len", max_len)
    for key in ("dtype", "param_dtype"):
        if key in values:
            values[key] = jnp.dtype(values[key])
    if values.get("attention_kwargs") is not None:
        values["attention_kwargs"] = dict(values["attention_kwargs"])
    options = models.TransformerOptions(**values)
    try:
        check_options(options)
    except ValueError as error:
        raise ValueError(str(error).replace("options.", "config.model.")) from None
    return options


def for_api(config: ml_collections.ConfigDict, model: nn.Module) -> Any:
    """``model`` as ``config.model.api`` builds it: the linen module itself (``"linen"``),
    or its Flax NNX twin behind linen's ``init`` / ``apply``
    (:class:`attn_jax.nnx.Functional`, ``"nnx"``): the same parameter tree, so
    checkpoints, resume and sweeps work alike."""
    api = config.model.get("api", "linen")
    if api not in MODEL_APIS:
        raise ValueError(f"config.model.api: expected one of {MODEL_APIS}, got {api!r}")
    if api == "linen":
        return model
    if getattr(getattr(model, "options", None), "scan_layers", False):
        raise ValueError(
            "config.model.scan_layers: the NNX models (config.model.api='nnx') run their "
            "layers unrolled; set scan_layers=False"
        )
    from attn_jax import nnx as attn_nnx

    try:
        attn_nnx.nnx_twin(model)
    except ValueError as error:
        raise ValueError(
            f"config.model.api: 'nnx' builds TransformerLM, TransformerEncoder, "
            f"EncoderDecoder (token sources) and VisionTransformer models; this task's "
            f"{type(model).__name__} is linen-only ({error})"
        ) from None
    return attn_nnx.Functional(model)


def linen_model(model: Any) -> nn.Module:
    """The linen module behind a task's model (itself, or a :class:`Functional`'s)."""
    return getattr(model, "linen", model)


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, valid: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over ``valid`` positions, with token and sequence accuracy.

    Args:
      logits: ``[batch, length, vocab]``; labels / valid: ``[batch, length]``.

    Returns:
      ``(loss, {"loss", "token_accuracy", "accuracy"})``; ``accuracy`` is the fraction of
      sequences whose every valid position is predicted right (under teacher forcing).
    """
    labels = jnp.where(valid, labels, 0)
    weights = valid.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights).sum()
    loss = loss / count
    right = jnp.argmax(logits, -1) == labels
    token_accuracy = (right * weights).sum() / count
    accuracy = jnp.all(right | ~valid, axis=-1).mean()
    return loss, {"loss": loss, "token_accuracy": token_accuracy, "accuracy": accuracy}


def monitored_count(config: ml_collections.ConfigDict, available: int, what: str) -> int:
    """How many of ``available`` evaluation examples are scored while training:
    ``config.data.num_eval``, or for 0 as many whole batches (``config.train.batch_size``)
    as there are (the file tasks: ``text``, ``pairs``, ``labelled``).

    Args:
      available: the examples the evaluation files give; what: their name in messages
        (``"pairs"``, ``"whole windows of 64 tokens"``).

    Raises:
      ValueError: ``num_eval`` not an integer >= 0 or more than ``available``
        (``config.data.num_eval: ...``), or fewer than one batch available
        (``config.data.eval_files: ...``).
    """
    wanted, batch = config.data.get("num_eval", 0), config.train.batch_size
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 0:
        raise ValueError(f"config.data.num_eval: expected an integer >= 0, got {wanted!r}")
    if wanted > available:
        raise ValueError(
            f"config.data.num_eval: {wanted} asked, but config.data.eval_files give "
            f"{available} {what}"
        )
    count = wanted or available // batch * batch
    if not count:
        raise ValueError(
            f"config.data.eval_files: {available} {what}, fewer than one batch "
            f"(config.train.batch_size={batch})"
        )
    return count


def monitored_subset(count: int, size: int, seed: int) -> np.ndarray:
    """The sorted indices of ``size`` of ``count`` evaluation examples scored while training:
    a fixed random subset (by ``seed``), so that files sorted by label or length are not
    monitored on their first examples only."""
    return np.sort(np.random.default_rng((seed, count)).permutation(count)[:size])


def predict_in_batches(
    fn: Callable[..., jax.Array], arrays: tuple[np.ndarray, ...], batch_size: int = 256
) -> np.ndarray:
    """``fn(*batch)`` over the leading axis of ``arrays`` in fixed-size batches (the last
    one padded by repeating its first row, so ``fn`` compiles once); outputs concatenated."""
    count = len(arrays[0])
    outputs = []
    for start in range(0, count, batch_size):
        chunk = [a[start : start + batch_size] for a in arrays]
        real = len(chunk[0])
        if real < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[:1], batch_size - real, 0)]) for c in chunk]
        outputs.append(np.asarray(fn(*chunk))[:real])
    return np.concatenate(outputs)


def weights_kernel(name: str) -> str | None:
    """A kernel that returns the weights ``name`` computes, for plotting: ``name`` itself,
    ``"dot_product"`` for an exact kernel that cannot return weights (same function, same
    parameters), or ``None`` for an approximate one (its weights are not softmax's)."""
    capabilities = kernels.capabilities(name)
    if capabilities.weights:
        return name
    return "dot_product" if capabilities.exact else None
