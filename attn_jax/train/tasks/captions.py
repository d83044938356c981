"""Cross-modal attention: captioning strips of digits (image -> text).

``digit_captions``: strips of 3-6 scikit-learn digits side by side, captioned with their
English words (:mod:`attn_jax.data.digit_strips`); train strips from the digits' train
images with 3-5 digits, test strips from its test images with 3-6, and
``config.data.num_eval`` validation strips (3-5 digits) from the share
``config.data.valid_fraction`` of the train images that the train strips do not use. Models
(``config.model.name``), both reading the strip as patches
(:class:`~attn_jax.models.PatchEmbedder`, ``config.model.patch_size``):

- ``"encoder_decoder"``: :class:`~attn_jax.models.EncoderDecoder` with a patch source: a
  ViT encoder over the patches and a Transformer decoder cross-attending to them.
- ``"seq2seq_rnn"``: :class:`~attn_jax.models.Seq2SeqRNN` with a patch source, an LSTM
  decoder with additive (Bahdanau) attention over the patch features ("show, attend and
  tell": ``config.model.encoder_cell="none"``, optional 3x3 convolutions
  ``config.model.conv_channels`` before the patches).

Training is teacher-forced and monitored on the validation strips (``"accuracy"``: every
word of a caption right; it picks the best checkpoint), so the test strips stay unseen
until the final evaluation, which scores the last parameters. The final evaluation
decodes every test strip greedily and with beam search (``config.data.beam_size``,
``config.data.beam_alpha``) through :func:`attn_jax.decode.translate` and reports
:func:`caption_metrics`: greedy at the top level, beam search under ``"beam"``. The
pictures draw, for a few test strips, each generated word's attention over the strip
(:func:`attn_jax.viz.save_overlay`): the decoder's cross-attention averaged over heads,
one picture per decoder layer, or the RNN's additive attention; and the same weights as
matrices (:func:`attn_jax.viz.save_attention`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attn_jax import models, viz
from attn_jax.data import digit_strips
from attn_jax.data.batching import ArrayDataset
from attn_jax.data.vocab import PAD, pad_sequences
from attn_jax.models.patches import PATCH_POSITIONS, patch_grid
from attn_jax.train.tasks.base import (
    Task,
    TaskDefinition,
    for_api,
    model_fields,
    transformer_options,
)
from attn_jax.train.tasks.plots import plot_layers
from attn_jax.train.tasks.seq2seq import (
    attention_rows,
    bleu,
    check_init,
    check_rnn_attention,
    kernel_name,
    loss_fn_for,
    plotted_model,
    translate_in_batches,
)

__all__ = ["TASKS", "caption_metrics", "strip_arrays", "word_accuracy"]

MODELS = ("encoder_decoder", "seq2seq_rnn")
# config.model keys read here, not fields of the model classes.
PATCH_KEYS = ("patch_size", "conv_channels", "patch_positions")
Arrays = dict[str, np.ndarray]


def word_accuracy(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> float:
    """Position-wise word accuracy over a corpus: words equal at the same position,
    divided by ``max(len(hypothesis), len(reference))`` summed over the pairs.

    A missing word and an extra word each count as one wrong word; words are compared
    position by position (no alignment), so a word dropped in the middle makes the rest
    of the caption wrong too. 1.0 iff every caption is exact.
    """
    right = total = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        right += sum(h == r for h, r in zip(hypothesis, reference, strict=False))
        total += max(len(hypothesis), len(reference))
    return right / total if total else 1.0


def caption_metrics(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    lengths: Sequence[int],
) -> dict[str, Any]:
    """Exact match, BLEU and word accuracy, overall and by strip length.

    Args:
      hypotheses / references: word lists.
      lengths: each strip's digit count.

    Returns:
      ``{"count", "exact_match", "bleu", "word_accuracy", "by_length": {"3": {...}, ...}}``
      (fractions, BLEU 0-100 by sacrebleu; see :func:`word_accuracy`).
    """
    lengths = np.asarray(lengths)

    def summary(chosen: np.ndarray) -> dict[str, Any]:
        hyps = [hypotheses[i] for i in np.flatnonzero(chosen)]
        refs = [references[i] for i in np.flatnonzero(chosen)]
        exact = [list(h) == list(r) for h, r in zip(hyps, refs, strict=True)]
        return {
            "count": len(hyps),
            "exact_match": float(np.mean(exact)),
            "bleu": bleu(hyps, refs),
            "word_accuracy": float(word_accuracy(hyps, refs)),
        }

    result = summary(np.ones(len(lengths), bool))
    result["by_length"] = {str(n): summary(lengths == n) for n in np.unique(lengths).tolist()}
    return result


def strip_arrays(strips: digit_strips.DigitStrips, tgt_len: int) -> Arrays:
    """A split as model inputs.

    Returns:
      ``src [n, 8, width]`` float32 pixels, ``tgt_in [n, tgt_len]`` (``<bos>`` + words,
      the decoder's input) and ``tgt_out [n, tgt_len]`` (words + ``<eos>``), int32 padded
      with 0.
    """
    vocab = digit_strips.vocabulary()
    targets = [vocab.encode(c, bos=True, eos=True) for c in strips.captions()]
    return {
        "src": strips.images,
        "tgt_in": pad_sequences([t[:-1] for t in targets], tgt_len),
        "tgt_out": pad_sequences([t[1:] for t in targets], tgt_len),
    }


# --- Data and models ----------------------------------------------------------------------


def _positive(config: ml_collections.ConfigDict, key: str) -> int:
    value = config.data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.data.{key}: expected a positive integer, got {value!r}")
    return value


def _check_data(config: ml_collections.ConfigDict) -> None:
    for key in ("num_train", "num_test", "num_eval", "min_digits", "beam_size", "num_plotted"):
        _positive(config, key)
    low, train_high = config.data.min_digits, _positive(config, "max_train_digits")
    test_high = _positive(config, "max_test_digits")
    if not low <= train_high <= test_high:
        raise ValueError(
            "config.data.min_digits / max_train_digits / max_test_digits: expected "
            f"min <= max_train <= max_test, got {low}, {train_high}, {test_high}"
        )
    for key in ("test_fraction", "valid_fraction"):
        fraction = config.data[key]
        if not isinstance(fraction, float) or not 0 < fraction < 1:
            raise ValueError(f"config.data.{key}: expected a float in (0, 1), got {fraction!r}")


def _tgt_len(config: ml_collections.ConfigDict) -> int:
    """Target array width: the longest caption plus ``<eos>``."""
    return config.data.max_test_digits + 1


def _canvas(config: ml_collections.ConfigDict) -> tuple[int, int]:
    return digit_strips.DIGIT_SIZE, digit_strips.DIGIT_SIZE * config.data.max_test_digits


def _strips(config: ml_collections.ConfigDict) -> dict[str, digit_strips.DigitStrips]:
    data = config.data
    return digit_strips.make_digit_strips(
        data.num_train,
        data.num_test,
        train_lengths=(data.min_digits, data.max_train_digits),
        test_lengths=(data.min_digits, data.max_test_digits),
        seed=config.seed,
        test_fraction=data.test_fraction,
        num_valid=data.num_eval,
        valid_fraction=data.valid_fraction,
    )


def _source(
    config: ml_collections.ConfigDict, features: int, dtype, param_dtype, *, unordered: str
):
    """The :class:`PatchEmbedder` of ``config.model`` (errors name the key); ``unordered``:
    why the encoder has no positions of its own (empty if it has: RoPE, a recurrent
    encoder), which makes ``patch_positions="none"`` an error."""
    patch = config.model.get("patch_size", 4)
    if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1 or 8 % patch:
        raise ValueError(f"config.model.patch_size: expected 1, 2, 4 or 8, got {patch!r}")
    channels = tuple(config.model.get("conv_channels", ()) or ())
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in channels):
        raise ValueError(
            f"config.model.conv_channels: expected positive integers, got {list(channels)!r}"
        )
    positions = config.model.get("patch_positions", "learned")
    if positions not in PATCH_POSITIONS:
        raise ValueError(
            f"config.model.patch_positions: expected one of {PATCH_POSITIONS}, got {positions!r}"
        )
    if positions == "none" and unordered:
        raise ValueError(
            f"config.model.patch_positions: 'none' leaves the encoder without positions "
            f"({unordered}): use 'learned' or 'sinusoidal'"
        )
    return models.PatchEmbedder(
        features,
        patch,
        conv_channels=channels,
        positions=positions,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _model(config: ml_collections.ConfigDict):
    name = config.model.get("name")
    vocab_size = len(digit_strips.vocabulary())
    tgt_len = _tgt_len(config)
    if name == "encoder_decoder":
        options = transformer_options(config.model, tgt_len, extra=PATCH_KEYS)
        unordered = (
            ""
            if options.positions == "rope"
            else f"config.model.positions={options.positions!r} positions the decoder's "
            "words, not the patches; only 'rope' does both"
        )
        source = _source(
            config, options.width, options.dtype, options.param_dtype, unordered=unordered
        )
        return for_api(
            config, models.EncoderDecoder(0, vocab_size, options, pad_id=PAD, source=source)
        )
    if name == "seq2seq_rnn":
        check_rnn_attention(config)
        rnn_keys = {k: v for k, v in config.model.items() if k not in PATCH_KEYS}
        fields = model_fields(
            ml_collections.ConfigDict(rnn_keys),
            models.Seq2SeqRNN,
            exclude=("src_vocab_size", "tgt_vocab_size", "pad_id", "source"),
        )
        embed_dim = fields.get("embed_dim", 64)
        dtypes = {k: fields.get(k, jnp.float32) for k in ("dtype", "param_dtype")}
        unordered = ""
        if fields.get("encoder_cell", "lstm") == "none":
            unordered = "config.model.encoder_cell='none': no recurrent encoder reads them in order"
        source = _source(config, embed_dim, **dtypes, unordered=unordered)
        model = models.Seq2SeqRNN(0, vocab_size, pad_id=PAD, source=source, **fields)
        model = check_init(model, jax.ShapeDtypeStruct((1, *_canvas(config)), jnp.float32), tgt_len)
        return for_api(config, model)
    raise ValueError(f"config.model.name: expected one of {MODELS}, got {name!r}")


# --- Final evaluation and pictures --------------------------------------------------------


def _batch_size(test: digit_strips.DigitStrips) -> int:
    """Decoding batch of the final evaluation and the pictures (one compiled program)."""
    return min(256, len(test))


def _final_eval(model, test: digit_strips.DigitStrips, config: ml_collections.ConfigDict):
    vocab, tgt_len = digit_strips.vocabulary(), _tgt_len(config)
    references = test.captions()
    beam = {"beam_size": config.data.beam_size, "alpha": config.data.get("beam_alpha", 0.6)}

    def final_eval(params) -> dict[str, Any]:
        results = {}
        for method, options in (("greedy", {}), ("beam", beam)):
            outputs = translate_in_batches(
                model,
                params,
                test.images,
                tgt_len,
                batch_size=_batch_size(test),
                method=method,
                **options,
            )
            hypotheses = [vocab.decode(row) for row in outputs]
            results[method] = caption_metrics(hypotheses, references, test.lengths)
        return {**results["greedy"], "beam": {**beam, **results["beam"]}}

    return final_eval


def _plotted(test: digit_strips.DigitStrips, count: int) -> list[int]:
    """Test strips to draw: the first strip of each of the ``count`` longest lengths."""
    lengths = sorted(set(test.lengths.tolist()))[-count:]
    return [int(np.flatnonzero(test.lengths == n)[0]) for n in lengths]


def _plot(model, test: digit_strips.DigitStrips, config: ml_collections.ConfigDict, title: str):
    vocab, tgt_len = digit_strips.vocabulary(), _tgt_len(config)
    chosen = _plotted(test, config.data.num_plotted)
    images = test.images[chosen]
    source = model.source
    grid = patch_grid(*images.shape[1:], source.patch_size)
    patch_labels = [f"r{r}c{c}" for r in range(grid[0]) for c in range(grid[1])]

    def plot(params, directory: pathlib.Path) -> list[pathlib.Path]:
        plotted = plotted_model(model)
        if plotted is None:
            return []
        outputs = translate_in_batches(model, params, images, tgt_len, batch_size=_batch_size(test))
        paths = []
        for i, index in enumerate(chosen):
            output = vocab.decode(outputs[i])
            rows, layers = attention_rows(
                model, plotted, params, images[i : i + 1], output, vocab, tgt_len
            )
            truth = test.captions()[index]
            verdict = "correct" if output == truth else f"wrong, truth: {' '.join(truth)}"
            heading = f"{title}, {len(truth)} digits ({verdict})"
            for name, weights in layers.items():
                heads = weights.shape[1]
                label = f"{name}, mean over {heads} heads" if heads > 1 else name
                filename = f"example_{i}_overlay_{name.replace('/', '_')}.png"
                paths.append(
                    viz.save_overlay(
                        directory / filename,
                        images[i],
                        weights[0].mean(0),  # [heads, steps, patches] -> [steps, patches]
                        grid,
                        words=rows,
                        title=f"{heading}\n{label}",
                    )
                )
            paths += plot_layers(
                layers,
                directory,
                f"example_{i}",
                x_labels=patch_labels,
                y_labels=rows,
                title=f"{heading}:",
                x_name="patch (row, column)",
                y_name="output",
            )
        return paths

    return plot


def _build(config: ml_collections.ConfigDict) -> Task:
    _check_data(config)
    model = _model(config)
    strips = _strips(config)
    tgt_len = _tgt_len(config)
    test = strips["test"]
    name = "ViT + Transformer decoder" if isinstance(model, models.EncoderDecoder) else "LSTM"
    rows, cols = patch_grid(*_canvas(config), model.source.patch_size)
    return Task(
        model=model,
        train=ArrayDataset(strip_arrays(strips["train"], tgt_len), seed=config.seed),
        eval=ArrayDataset(strip_arrays(strips["valid"], tgt_len), seed=config.seed + 1),
        loss_fn=loss_fn_for(model),
        model_inputs=lambda batch: (batch["src"], batch["tgt_in"]),
        tokens_per_example=rows * cols + tgt_len,
        final_eval=_final_eval(model, test, config),
        plot_examples=_plot(model, test, config, f"{name} ({kernel_name(model)})"),
    )


def _validate(config: ml_collections.ConfigDict) -> None:
    _check_data(config)
    _model(config)


TASKS = {"digit_captions": TaskDefinition(_build, _validate)}
