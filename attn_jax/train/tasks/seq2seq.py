"""Sequence-to-sequence tasks: SCAN and English -> German number translation.

Models (``config.model.name``): ``"seq2seq_rnn"`` (:class:`~attn_jax.models.Seq2SeqRNN`:
LSTM with additive, multiplicative or no attention, ``config.model.attention``) or
``"encoder_decoder"`` (:class:`~attn_jax.models.EncoderDecoder`, any kernel). Training is
teacher-forced; ``"accuracy"`` during training is the fraction of sequences whose every
target token is predicted right under teacher forcing (``"token_accuracy"`` per token). The
final evaluation greedily decodes the whole test split and reports exact match (and BLEU by
sacrebleu for number translation), overall and by length bucket.

Other tasks reuse the pieces: :class:`Seq2SeqData`, :func:`make_model`, :func:`make_task`
(``pairs``), :func:`loss_fn_for`, :func:`translate_in_batches`, :func:`check_init` and
:func:`plotted_model` and :func:`attention_rows` (``digit_captions``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attn_jax import decode, kernels, models
from attn_jax.data import numbers, scan
from attn_jax.data.batching import ArrayDataset
from attn_jax.data.vocab import BOS, EOS, PAD, Vocabulary, pad_sequences
from attn_jax.train.tasks.base import (
    LossFn,
    Task,
    TaskDefinition,
    for_api,
    linen_model,
    masked_cross_entropy,
    model_fields,
    predict_in_batches,
    transformer_options,
)
from attn_jax.train.tasks.plots import plot_layers, sowed_attention, weights_model

__all__ = [
    "TASKS",
    "Seq2SeqData",
    "attention_rows",
    "bleu",
    "bucket_metrics",
    "check_init",
    "check_rnn_attention",
    "encode_pairs",
    "kernel_name",
    "loss_fn_for",
    "make_model",
    "make_task",
    "plotted_model",
    "translate_in_batches",
]

Pair = tuple[Sequence[str], Sequence[str]]
MODELS = ("seq2seq_rnn", "encoder_decoder")
NUM_PLOTTED = 2


@dataclasses.dataclass
class Seq2SeqData:
    """A seq2seq task's token pairs: ``train``, ``eval`` (scored teacher-forced while
    training, which picks the best checkpoint) and ``test`` (the final evaluation), and
    the vocabularies; ``with_bleu``: the default final evaluation reports BLEU too."""

    train: list[Pair]
    eval: list[Pair]
    test: list[Pair]
    src_vocab: Vocabulary
    tgt_vocab: Vocabulary
    with_bleu: bool

    def lengths(self) -> tuple[int, int]:
        """Array widths: the longest source, and the longest target plus ``<eos>``."""
        pairs = self.train + self.test + self.eval
        return max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs) + 1


def encode_pairs(
    pairs: Sequence[Pair], src_vocab: Vocabulary, tgt_vocab: Vocabulary, src_len: int, tgt_len: int
) -> dict[str, np.ndarray]:
    """Token pairs as padded id arrays.

    Returns:
      ``src [n, src_len]``, ``tgt_in [n, tgt_len]`` (``<bos>`` + target, the decoder's
      input) and ``tgt_out [n, tgt_len]`` (target + ``<eos>``), int32, padded with 0.
    """
    targets = [tgt_vocab.encode(t, bos=True, eos=True) for _, t in pairs]
    return {
        "src": pad_sequences([src_vocab.encode(s) for s, _ in pairs], src_len),
        "tgt_in": pad_sequences([t[:-1] for t in targets], tgt_len),
        "tgt_out": pad_sequences([t[1:] for t in targets], tgt_len),
    }


def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of token lists, without further tokenisation; n-gram
    orders that no hypothesis reaches are left out (effective order), so buckets of short
    sequences get a defined score."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize="none", effective_order=True)
    score = metric.corpus_score(
        [" ".join(h) for h in hypotheses], [[" ".join(r) for r in references]]
    )
    return float(score.score)


def bucket_metrics(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    lengths: Sequence[int],
    edges: Sequence[int],
    *,
    with_bleu: bool,
) -> dict[str, Any]:
    """Exact match (and BLEU) overall and per length bucket.

    Args:
      hypotheses / references: token lists.
      lengths: the length that buckets each example (e.g. its source length).
      edges: inclusive upper bounds of the buckets, increasing; longer examples fall in a
        last ``">edge"`` bucket.

    Returns:
      ``{"exact_match", ["bleu",] "count", "buckets": [{"bucket": "1-3", "count", ...}]}``;
      exact match is a fraction, BLEU 0-100.
    """
    exact = np.array([list(h) == list(r) for h, r in zip(hypotheses, references, strict=True)])
    lengths = np.asarray(lengths)

    def summary(chosen: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": int(chosen.sum()),
            "exact_match": float(exact[chosen].mean()),
        }
        if with_bleu:
            out["bleu"] = bleu(
                [hypotheses[i] for i in np.flatnonzero(chosen)],
                [references[i] for i in np.flatnonzero(chosen)],
            )
        return out

    result = summary(np.ones(len(exact), bool))
    result["buckets"] = []
    low = 1
    for high in [*edges, None]:
        chosen = lengths >= low if high is None else (lengths >= low) & (lengths <= high)
        if chosen.any():
            name = f">{low - 1}" if high is None else f"{low}-{high}"
            result["buckets"].append({"bucket": name, **summary(chosen)})
        if high is not None:
            low = high + 1
    return result


# --- Models -------------------------------------------------------------------------------


def check_rnn_attention(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming ``config.model.attention`` for a registered kernel that
    returns no attention weights (the RNN decoder records them at every step)."""
    attention = config.model.get("attention", "additive")
    if attention in kernels.available() and not kernels.capabilities(attention).weights:
        raise ValueError(
            f"config.model.attention: {attention!r} returns no attention weights, which "
            "the RNN decoder records; use additive, multiplicative, dot_product or none"
        )


def check_init(model: nn.Module, src: jax.ShapeDtypeStruct, tgt_len: int) -> nn.Module:
    """``model`` after an abstract ``init`` (``jax.eval_shape``: no computation) on ``src``
    and ``[1, tgt_len]`` targets, so that the attribute checks modules make in ``setup()``
    surface before training: ``ValueError("Seq2SeqRNN: 'hidden_dim' ...")`` (or
    ``PatchEmbedder``'s) is raised as ``config.model.hidden_dim ...``."""
    try:
        jax.eval_shape(model.init, jax.random.key(0), src, jnp.ones((1, tgt_len), jnp.int32))
    except ValueError as error:
        message = re.sub(r"(Seq2SeqRNN|PatchEmbedder): '(\w+)'", r"config.model.\2", str(error))
        raise ValueError(message) from None
    return model


def make_model(config: ml_collections.ConfigDict, data: Seq2SeqData) -> nn.Module:
    """The model ``config.model.name`` for token pairs (``"seq2seq_rnn"`` or
    ``"encoder_decoder"``), checked: errors name the ``config.model`` key."""
    name = config.model.get("name")
    src_len, tgt_len = data.lengths()
    if name == "seq2seq_rnn":
        check_rnn_attention(config)
        fields = model_fields(
            config.model, models.Seq2SeqRNN, exclude=("src_vocab_size", "tgt_vocab_size")
        )
        model = models.Seq2SeqRNN(len(data.src_vocab), len(data.tgt_vocab), pad_id=PAD, **fields)
        model = check_init(model, jax.ShapeDtypeStruct((1, src_len), jnp.int32), tgt_len)
        return for_api(config, model)
    if name == "encoder_decoder":
        options = transformer_options(config.model, max(src_len, tgt_len))
        model = models.EncoderDecoder(len(data.src_vocab), len(data.tgt_vocab), options, pad_id=PAD)
        return for_api(config, model)
    raise ValueError(f"config.model.name: expected one of {MODELS}, got {name!r}")


def kernel_name(model: nn.Module) -> str:
    """The attention a seq2seq model uses (the RNN's ``attention``, else the options')."""
    return getattr(model, "attention", None) or model.options.attention


def loss_fn_for(model: nn.Module) -> LossFn:
    """Teacher-forced cross-entropy of ``batch["tgt_out"]`` (``<pad>``: no loss) given
    ``batch["src"]`` and ``batch["tgt_in"]``: ``(params, batch, rng, deterministic) ->
    (loss, {"loss", "token_accuracy", "accuracy"})`` (:func:`masked_cross_entropy`;
    dropout only in the Transformer)."""

    def loss_fn(params, batch, rng, deterministic):
        if isinstance(model, models.Seq2SeqRNN):  # no dropout
            logits = model.apply({"params": params}, batch["src"], batch["tgt_in"])
        else:
            logits = model.apply(
                {"params": params},
                batch["src"],
                batch["tgt_in"],
                deterministic=deterministic,
                rngs={"dropout": rng},
            )
        return masked_cross_entropy(logits, batch["tgt_out"], batch["tgt_out"] != PAD)

    return loss_fn


# --- Final evaluation and plots -----------------------------------------------------------


def translate_in_batches(
    model: nn.Module,
    params: Any,
    src: np.ndarray,
    max_len: int,
    *,
    batch_size: int = 256,
    **options: Any,
) -> np.ndarray:
    """Decodes ``src [n, ...]`` (token ids ``[n, src_len]``, or what the model's ``source``
    takes) with :func:`attn_jax.decode.translate`, ``batch_size`` at a time (one compiled
    program; ``options``: ``method="beam"``, ``beam_size``, ...; default greedy).

    Returns:
      ``[n, max_len]`` int target ids, ``<pad>`` after the first ``<eos>``.
    """
    return predict_in_batches(
        lambda s: decode.translate(
            model, params, s, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD, **options
        ),
        (src,),
        batch_size=batch_size,
    )


def plotted_model(model: nn.Module) -> nn.Module | None:
    """``model`` with a kernel that returns its attention weights (:func:`weights_model`),
    or ``None`` when it has none to plot (an approximate kernel, an RNN without attention)."""
    if getattr(model, "attention", "") == "none":
        return None
    return weights_model(model)


def attention_rows(
    model: nn.Module,
    plotted: nn.Module,
    params: Any,
    src: np.ndarray,
    output: list[str],
    tgt_vocab: Vocabulary,
    tgt_len: int,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The attention behind a decoded ``output`` (its tokens) of one source ``src [1, ...]``.

    Args:
      plotted: ``model`` with a kernel that returns weights (:func:`plotted_model`).

    Returns:
      ``(rows, layers)``: the output tokens and ``<eos>`` if emitted (row ``t`` is the step
      that emitted token ``t``), and ``{name: weights [1, heads, rows, src positions]}``:
      the decoder layers' cross-attention, or the RNN's ``"alignment"``.
    """
    rows = [*output, "<eos>"] if len(output) < tgt_len else output
    tgt_in = np.asarray([tgt_vocab.encode(rows[:-1], bos=True)], np.int32)
    layers = sowed_attention(plotted, params, src, tgt_in)
    if isinstance(linen_model(model), models.EncoderDecoder):
        return rows, {k: v for k, v in layers.items() if k.endswith("cross_attention")}
    return rows, {"alignment": layers[""]}


def _final_eval(model, data: Seq2SeqData, config: ml_collections.ConfigDict):
    src_len, tgt_len = data.lengths()
    arrays = encode_pairs(data.test, data.src_vocab, data.tgt_vocab, src_len, tgt_len)
    by_source = config.data.get("bucket_by", "source") == "source"
    lengths = [len(s if by_source else t) for s, t in data.test]

    def final_eval(params) -> dict[str, Any]:
        outputs = translate_in_batches(model, params, arrays["src"], tgt_len)
        hypotheses = [data.tgt_vocab.decode(row) for row in outputs]
        references = [list(t) for _, t in data.test]
        return bucket_metrics(
            hypotheses,
            references,
            lengths,
            list(config.data.length_buckets),
            with_bleu=data.with_bleu,
        )

    return final_eval


def _plot_seq2seq(model, data: Seq2SeqData, title: str):
    """Alignment heatmaps (source tokens x output tokens) of a median-length and the
    longest of the first 200 test pairs, for the model's own greedy output."""
    src_len, tgt_len = data.lengths()
    candidates = data.test[:200]
    order = np.argsort([len(s) for s, _ in candidates], kind="stable")
    chosen = [candidates[i] for i in (order[len(order) // 2], order[-1])][:NUM_PLOTTED]
    arrays = encode_pairs(chosen, data.src_vocab, data.tgt_vocab, src_len, tgt_len)

    def plot(params, directory: pathlib.Path) -> list[pathlib.Path]:
        plotted = plotted_model(model)
        if plotted is None:
            return []
        outputs = translate_in_batches(
            model, params, arrays["src"], tgt_len, batch_size=len(chosen)
        )
        paths = []
        for i, (source, reference) in enumerate(chosen):
            output = data.tgt_vocab.decode(outputs[i])
            rows, layers = attention_rows(
                model, plotted, params, arrays["src"][i : i + 1], output, data.tgt_vocab, tgt_len
            )
            verdict = "correct" if output == list(reference) else "wrong"
            paths += plot_layers(
                layers,
                directory,
                f"example_{i}",
                x_labels=list(source),
                y_labels=rows,
                title=f"{title}, {verdict}:",
                x_name="source",
                y_name="output",
                trim=(len(rows), len(source)),
            )
        return paths

    return plot


def make_task(
    config: ml_collections.ConfigDict,
    data: Seq2SeqData,
    *,
    model: nn.Module | None = None,
    final_eval: Callable[[Any], dict[str, Any]] | None = None,
) -> Task:
    """The :class:`Task` of token pairs: teacher-forced training on ``data.train``, scored
    on ``data.eval`` while training, alignment heatmaps of test pairs.

    Args:
      model: default :func:`make_model`.
      final_eval: ``params -> metrics``; default: greedy decoding of ``data.test`` with
        :func:`bucket_metrics` by ``config.data.length_buckets`` (and ``bucket_by``).
    """
    model = make_model(config, data) if model is None else model
    src_len, tgt_len = data.lengths()

    def arrays(pairs: list[Pair]) -> dict[str, np.ndarray]:
        return encode_pairs(pairs, data.src_vocab, data.tgt_vocab, src_len, tgt_len)

    return Task(
        model=model,
        train=ArrayDataset(arrays(data.train), seed=config.seed),
        eval=ArrayDataset(arrays(data.eval), seed=config.seed + 1),
        loss_fn=loss_fn_for(model),
        model_inputs=lambda batch: (batch["src"], batch["tgt_in"]),
        tokens_per_example=src_len + tgt_len,
        final_eval=_final_eval(model, data, config) if final_eval is None else final_eval,
        plot_examples=_plot_seq2seq(model, data, f"{config.data.name} ({kernel_name(model)})"),
    )


def _check_common(config: ml_collections.ConfigDict) -> None:
    edges = list(config.data.length_buckets)
    if any(not isinstance(e, int) for e in edges) or edges != sorted(set(edges)) or not edges:
        raise ValueError(f"config.data.length_buckets: expected increasing integers, got {edges!r}")
    if config.data.get("bucket_by", "source") not in ("source", "target"):
        raise ValueError(
            f"config.data.bucket_by: expected 'source' or 'target', got {config.data.bucket_by!r}"
        )
    if config.data.num_eval < 1:
        raise ValueError(f"config.data.num_eval: expected >= 1, got {config.data.num_eval}")


# --- SCAN ---------------------------------------------------------------------------------


def _scan_data(config: ml_collections.ConfigDict) -> Seq2SeqData:
    _check_common(config)
    train, test = scan.make_split(config.data.split, config.seed)
    num_test = config.data.get("num_test", 0)
    if not isinstance(num_test, int) or not 0 <= num_test <= len(test):
        raise ValueError(
            f"config.data.num_test: expected 0 (the whole test split) to {len(test)}, "
            f"got {num_test!r}"
        )
    if config.data.num_eval > len(test):
        raise ValueError(
            f"config.data.num_eval: {config.data.num_eval} exceeds the {len(test)} test pairs"
        )
    pairs = scan.all_pairs()
    split = lambda items: [(c.split(), a.split()) for c, a in items]
    return Seq2SeqData(
        train=split(train),
        eval=split(test[: config.data.num_eval]),  # SCAN has no validation split
        test=split(test[: num_test or len(test)]),
        src_vocab=Vocabulary.from_sequences(c.split() for c, _ in pairs),
        tgt_vocab=Vocabulary.from_sequences(a.split() for _, a in pairs),
        with_bleu=False,
    )


def _build_scan(config: ml_collections.ConfigDict) -> Task:
    return make_task(config, _scan_data(config))


# --- Number translation -------------------------------------------------------------------


def _number_data(config: ml_collections.ConfigDict) -> Seq2SeqData:
    _check_common(config)
    data = config.data
    for key in ("num_train", "num_valid", "num_test"):
        if not isinstance(data[key], int) or data[key] < 1:
            raise ValueError(f"config.data.{key}: expected a positive integer, got {data[key]!r}")
    if data.num_eval > data.num_valid:
        raise ValueError(
            f"config.data.num_eval: {data.num_eval} exceeds config.data.num_valid "
            f"({data.num_valid})"
        )
    try:
        splits = numbers.make_number_pairs(
            {"train": data.num_train, "valid": data.num_valid, "test": data.num_test},
            data.max_digits,
            config.seed,
        )
    except ValueError as error:  # "max_digits: ..." or "sizes: ..." (the three sizes)
        key = str(error).replace("sizes:", "num_train + num_valid + num_test:", 1)
        raise ValueError(f"config.data.{key}") from None
    as_pairs = lambda items: [(p.source, p.target) for p in items]
    return Seq2SeqData(
        train=as_pairs(splits["train"]),
        eval=as_pairs(splits["valid"][: data.num_eval]),
        test=as_pairs(splits["test"]),
        src_vocab=numbers.english_vocabulary(),
        tgt_vocab=numbers.german_vocabulary(),
        with_bleu=True,
    )


def _build_numbers(config: ml_collections.ConfigDict) -> Task:
    return make_task(config, _number_data(config))


def _validate(make_data):
    def validate(config: ml_collections.ConfigDict) -> None:
        make_model(config, make_data(config))

    return validate


TASKS = {
    "scan": TaskDefinition(_build_scan, _validate(_scan_data)),
    "numbers": TaskDefinition(_build_numbers, _validate(_number_data)),
}
