"""``pairs``: sequence-to-sequence on the user's own TSV files (``source<TAB>target`` lines).

Config (``config.data``): ``train_files`` / ``eval_files`` (paths or globs, several
separated by commas; format in :mod:`attn_jax.data.user_formats`), ``tokenize``
(``"char"`` or ``"whitespace"``, both sides; see :mod:`attn_jax.data.user_files`),
``num_eval`` (evaluation pairs scored teacher-forced while training, a fixed random
subset, a multiple of the batch size; 0: as many whole batches as the evaluation files
give; those pairs come from the evaluation files, so the "best" checkpoint is chosen on
them, while the final evaluation scores the last parameters). Source and target
vocabularies come from the training files; evaluation tokens outside them become
``<unk>`` (the model then cannot produce an unseen target token: the reference keeps it).

Models (``config.model.name``) as for the built-in seq2seq tasks: ``"encoder_decoder"``
(:class:`~attn_jax.models.EncoderDecoder`) or ``"seq2seq_rnn"``
(:class:`~attn_jax.models.Seq2SeqRNN`). The final evaluation decodes every evaluation
pair greedily (:func:`attn_jax.decode.translate`) and reports ``exact_match`` (the
output's token list equals the target's: an unknown output token ``<unk>`` never matches,
not even a target whose text reads ``<unk>``), ``bleu`` and ``chrf`` (sacrebleu corpus
scores, 0-100, of the detokenised output against the target: BLEU over its
whitespace-separated words, chrF over its characters), ``count``, the unknown evaluation
tokens, and a few ``examples`` and ``mistakes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from attn_jax.data.user_files import TOKENIZERS, build_vocabulary, split_files, with_unknown
from attn_jax.data.user_formats import Pair, read_pairs
from attn_jax.train.tasks import seq2seq
from attn_jax.train.tasks.base import (
    Task,
    TaskDefinition,
    check_fields,
    monitored_count,
    monitored_subset,
)

__all__ = ["FIELDS", "NUM_EXAMPLES", "TASKS", "detokenize", "pair_metrics"]

FIELDS = ("name", "train_files", "eval_files", "tokenize", "num_eval")
NUM_EXAMPLES = 5  # decoded examples in final_metrics.json


def detokenize(tokens: Sequence[str], mode: str) -> str:
    """The text of ``tokens``: joined as they are (``"char"``) or with spaces."""
    return ("" if mode == "char" else " ").join(tokens)


def pair_metrics(
    outputs: Sequence[Sequence[str]],
    targets: Sequence[Sequence[str]],
    sources: Sequence[Sequence[str]],
    mode: str,
) -> dict[str, Any]:
    """Scores of decoded token lists against the targets' (``mode``: how they detokenise).

    Returns:
      ``exact_match`` (the fraction of outputs whose token list equals the target's),
      corpus ``bleu`` and ``chrf`` (sacrebleu, 0-100, of the detokenised texts), ``count``,
      and the first :data:`NUM_EXAMPLES` ``examples`` and ``mistakes`` (wrong outputs):
      ``{"source", "target", "output"}``, detokenised.
    """
    from sacrebleu.metrics import CHRF

    exact = [list(o) == list(t) for o, t in zip(outputs, targets, strict=True)]
    texts = {
        name: [detokenize(tokens, mode) for tokens in sequences]
        for name, sequences in (("source", sources), ("target", targets), ("output", outputs))
    }
    chrf = CHRF().corpus_score(texts["output"], [texts["target"]]).score
    rows = [
        {"source": s, "target": t, "output": o}
        for s, t, o in zip(texts["source"], texts["target"], texts["output"], strict=True)
    ]
    return {
        "exact_match": float(np.mean(exact)),
        "bleu": seq2seq.bleu(
            [o.split() for o in texts["output"]], [t.split() for t in texts["target"]]
        ),
        "chrf": float(chrf),
        "count": len(outputs),
        "examples": rows[:NUM_EXAMPLES],
        "mistakes": [r for r, right in zip(rows, exact, strict=True) if not right][:NUM_EXAMPLES],
    }


@dataclasses.dataclass
class _Pairs:
    data: seq2seq.Seq2SeqData  # train pairs, evaluation pairs with <unk>, vocabularies
    eval_pairs: list[Pair]  # as read (the references)
    unknown: dict[str, int]


def _read(config: ml_collections.ConfigDict) -> _Pairs:
    data = config.data
    check_fields(data, FIELDS, "config.data")
    mode = data.get("tokenize", "char")
    if mode not in TOKENIZERS:
        raise ValueError(f"config.data.tokenize: expected one of {TOKENIZERS}, got {mode!r}")
    read = {
        split: read_pairs(files, f"config.data.{split}_files", mode)
        for split, files in split_files(data).items()
    }
    train = [(p.source, p.target) for p in read["train"]]
    src_vocab = build_vocabulary(s for s, _ in train)
    tgt_vocab = build_vocabulary(t for _, t in train)
    mapped, unknown = [], {"unknown_source_tokens": 0, "unknown_target_tokens": 0}
    for pair in read["eval"]:
        source, src_unknown = with_unknown(src_vocab, pair.source)
        target, tgt_unknown = with_unknown(tgt_vocab, pair.target)
        mapped.append((source, target))
        unknown["unknown_source_tokens"] += src_unknown
        unknown["unknown_target_tokens"] += tgt_unknown
    num_eval = monitored_count(config, len(mapped), "pairs")
    return _Pairs(
        seq2seq.Seq2SeqData(
            train=train,
            eval=[mapped[i] for i in monitored_subset(len(mapped), num_eval, config.seed)],
            test=mapped,
            src_vocab=src_vocab,
            tgt_vocab=tgt_vocab,
            with_bleu=True,
        ),
        read["eval"],
        unknown,
    )


def _final_eval(model, pairs: _Pairs, mode: str):
    data = pairs.data
    src_len, tgt_len = data.lengths()
    arrays = seq2seq.encode_pairs(data.test, data.src_vocab, data.tgt_vocab, src_len, tgt_len)
    targets = [p.target for p in pairs.eval_pairs]  # the references keep unseen tokens
    sources = [p.source for p in pairs.eval_pairs]

    def final_eval(params) -> dict[str, Any]:
        rows = seq2seq.translate_in_batches(model, params, arrays["src"], tgt_len)
        outputs = [data.tgt_vocab.decode(row) for row in rows]
        return {**pair_metrics(outputs, targets, sources, mode), **pairs.unknown}

    return final_eval


def _validate(config: ml_collections.ConfigDict) -> None:
    seq2seq.make_model(config, _read(config).data)


def _build(config: ml_collections.ConfigDict) -> Task:
    pairs = _read(config)
    model = seq2seq.make_model(config, pairs.data)
    final_eval = _final_eval(model, pairs, config.data.get("tokenize", "char"))
    return seq2seq.make_task(config, pairs.data, model=model, final_eval=final_eval)


TASKS = {"pairs": TaskDefinition(_build, _validate)}
