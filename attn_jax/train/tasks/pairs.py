"""``pairs``: sequence-to-sequence on the user's own TSV files (``source<TAB>target`` lines).

Config (``config.data``): ``train_files`` / ``eval_files`` (paths or globs, several
separated by commas; format in :mod:`attn_jax.data.user_formats`), ``tokenize``
(``"char"`` or ``"whitespace"``, both sides; see :mod:`attn_jax.data.user_files`),
``num_eval`` (evaluation pairs scored teacher-forced while training, a fixed random
subset, a multiple of the batch size; 0: as many whole batches as the evaluation files
give). Source and target
vocabularies come from the training files; evaluation tokens outside them become
``<unk>`` (the model then cannot produce an unseen target token: the reference keeps it).

Models (``config.model.name``) as for the built-in seq2seq tasks: ``"encoder_decoder"``
(:class:`~attn_jax.models.EncoderDecoder`) or ``"seq2seq_rnn"``
(:class:`~attn_jax.models.Seq2SeqRNN`). The final evaluation decodes every evaluation
pair greedily (:func:`attn_jax.decode.translate`) and reports ``exact_match`` (the
output's tokens equal the target's), ``bleu`` and ``chrf`` (sacrebleu corpus scores, 0-100,
of the detokenised output against the target: BLEU over its whitespace-separated words,
chrF over its characters), ``count``, the unknown evaluation tokens, and a few
``examples`` and ``mistakes``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from attn_jax.data.user_files import TOKENIZERS, build_vocabulary, resolve_files, with_unknown
from attn_jax.data.user_formats import Pair, read_pairs
from attn_jax.train.tasks import seq2seq
from attn_jax.train.tasks.base import Task, check_fields, monitored_subset
from attn_jax.train.tasks.registry import register_task

__all__ = ["FIELDS", "NUM_EXAMPLES", "detokenize", "pair_metrics"]

FIELDS = ("name", "train_files", "eval_files", "tokenize", "num_eval")
NUM_EXAMPLES = 5  # decoded examples in final_metrics.json


def detokenize(tokens: list[str], mode: str) -> str:
    """The text of ``tokens``: joined as they are (``"char"``) or with spaces."""
    return ("" if mode == "char" else " ").join(tokens)


def pair_metrics(outputs: list[str], targets: list[str], sources: list[str]) -> dict[str, Any]:
    """``exact_match`` (fraction), corpus ``bleu`` and ``chrf`` (sacrebleu, 0-100), ``count``,
    and the first :data:`NUM_EXAMPLES` ``examples`` and ``mistakes`` (wrong outputs):
    ``{"source", "target", "output"}`` (detokenised)."""
    from sacrebleu.metrics import CHRF

    exact = [o == t for o, t in zip(outputs, targets, strict=True)]
    chrf = CHRF().corpus_score(outputs, [targets]).score
    rows = [
        {"source": s, "target": t, "output": o}
        for s, t, o in zip(sources, targets, outputs, strict=True)
    ]
    return {
        "exact_match": float(np.mean(exact)),
        "bleu": seq2seq.bleu([o.split() for o in outputs], [t.split() for t in targets]),
        "chrf": float(chrf),
        "count": len(outputs),
        "examples": rows[:NUM_EXAMPLES],
        "mistakes": [r for r, right in zip(rows, exact, strict=True) if not right][:NUM_EXAMPLES],
    }


@dataclasses.dataclass
class _Pairs:
    data: Any  # seq2seq._Data: train pairs, evaluation pairs with <unk>, vocabularies
    eval_pairs: list[Pair]  # as read (the references)
    unknown: dict[str, int]


def _read(config: ml_collections.ConfigDict) -> _Pairs:
    data = config.data
    check_fields(data, FIELDS, "config.data")
    mode = data.get("tokenize", "char")
    if mode not in TOKENIZERS:
        raise ValueError(f"config.data.tokenize: expected one of {TOKENIZERS}, got {mode!r}")
    read = {}
    for split in ("train", "eval"):
        key = f"config.data.{split}_files"
        read[split] = read_pairs(resolve_files(data.get(f"{split}_files"), key), key, mode)
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
    num_eval, batch = data.get("num_eval", 0), config.train.batch_size
    if not isinstance(num_eval, int) or isinstance(num_eval, bool) or num_eval < 0:
        raise ValueError(f"config.data.num_eval: expected an integer >= 0, got {num_eval!r}")
    if num_eval > len(mapped):
        raise ValueError(
            f"config.data.num_eval: {num_eval} pairs asked, but config.data.eval_files hold "
            f"{len(mapped)}"
        )
    num_eval = num_eval or len(mapped) // batch * batch
    if not num_eval:
        raise ValueError(
            f"config.data.eval_files: {len(mapped)} pairs, fewer than one batch "
            f"(config.train.batch_size={batch})"
        )
    return _Pairs(
        seq2seq._Data(
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
    targets = [detokenize(p.target, mode) for p in pairs.eval_pairs]
    sources = [detokenize(p.source, mode) for p in pairs.eval_pairs]

    def final_eval(params) -> dict[str, Any]:
        rows = seq2seq._greedy(model, params, arrays["src"], tgt_len)
        outputs = [detokenize(data.tgt_vocab.decode(row), mode) for row in rows]
        return {**pair_metrics(outputs, targets, sources), **pairs.unknown}

    return final_eval


def _validate(config: ml_collections.ConfigDict) -> None:
    seq2seq._model(config, _read(config).data)


@register_task("pairs", validate=_validate)
def _build(config: ml_collections.ConfigDict) -> Task:
    pairs = _read(config)
    task = seq2seq._task(config, pairs.data)
    mode = config.data.get("tokenize", "char")
    return dataclasses.replace(task, final_eval=_final_eval(task.model, pairs, mode))
