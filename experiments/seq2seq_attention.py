"""Attention in seq2seq on English -> German number words: BLEU and exact match overall and
by input length, with and without attention (Bahdanau et al. 2015: without attention,
quality falls as inputs grow), plus alignment heatmaps.

Trains the LSTM seq2seq model with additive, multiplicative and no attention
(``configs/numbers_rnn.py``) and the Transformer encoder-decoder
(``configs/numbers_transformer.py``), ``:quick`` on CPU or the full variants with
``--full``, each in ``OUT_DIR/MODEL`` (reruns skip finished trials), then decodes the whole
test split greedily. Writes ``seq2seq.json``, ``seq2seq.md``, ``seq2seq.png`` (BLEU and exact
match against input length) and ``alignments/MODEL_*.png`` (each model's heatmaps)::

    python experiments/seq2seq_attention.py              # CPU: 4 trials of a few minutes
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from experiments.reporting import (
    load_config,
    markdown_table,
    percent,
    run_trials,
    save_figure,
    start,
    steps_override,
    write_outputs,
)

# name -> (config file, overrides)
MODELS = {
    "lstm_additive": ("numbers_rnn", {"model.attention": "additive"}),
    "lstm_multiplicative": ("numbers_rnn", {"model.attention": "multiplicative"}),
    "lstm_none": ("numbers_rnn", {"model.attention": "none"}),
    "transformer": ("numbers_transformer", {}),
}
TRIAL = "numbers"


def run(
    out_dir: str | pathlib.Path,
    *,
    models: Sequence[str] = tuple(MODELS),
    full: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains and evaluates every model; returns and writes the tables and figures."""
    out_dir = pathlib.Path(out_dir)
    finals: dict[str, dict[str, Any]] = {}
    for model in models:
        config_name, model_overrides = MODELS[model]
        base = load_config(config_name, None if full else "quick")
        result = run_trials(base, {TRIAL: model_overrides}, out_dir / model, overrides)
        finals[model] = result[TRIAL]["final"]
        for png in sorted((out_dir / model / TRIAL / "attention").glob("*.png")):
            (out_dir / "alignments").mkdir(parents=True, exist_ok=True)
            shutil.copy(png, out_dir / "alignments" / f"{model}_{png.name}")
    report = {"final": finals, "full": full}
    write_outputs(out_dir, "seq2seq", report, _markdown(finals))
    _figure(finals, out_dir / "seq2seq.png")
    return report


def _markdown(finals: dict[str, dict[str, Any]]) -> str:
    rows = [
        [m, f"{f['bleu']:.1f}" if f else "-", percent(f.get("exact_match"))]
        for m, f in finals.items()
    ]
    text = "Test split, greedy decoding (BLEU 0-100 on morpheme tokens; exact match %):\n\n"
    text += markdown_table(["model", "BLEU", "exact match"], rows)
    buckets = [b["bucket"] for b in next(f for f in finals.values() if f)["buckets"]]
    counts = [str(b["count"]) for b in next(f for f in finals.values() if f)["buckets"]]
    for metric, fmt in (("bleu", lambda v: f"{v:.1f}"), ("exact_match", percent)):
        name = "BLEU" if metric == "bleu" else "exact match (%)"
        text += f"\n{name} by number of English input tokens:\n\n"
        rows = [["examples", *counts]]
        rows += [[m, *(fmt(b[metric]) for b in f.get("buckets", []))] for m, f in finals.items()]
        text += markdown_table(["model", *buckets], rows)
    return text


def _figure(finals: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for model, final in finals.items():
        if not final:
            continue
        names = [b["bucket"] for b in final["buckets"]]
        axes[0].plot(names, [b["bleu"] for b in final["buckets"]], "o-", label=model)
        axes[1].plot(names, [100 * b["exact_match"] for b in final["buckets"]], "o-", label=model)
    for ax, label in zip(axes, ("BLEU", "exact match (%)"), strict=True):
        ax.set(xlabel="English input length (tokens)", ylabel=label, ylim=(0, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("English -> German number words: quality against input length")
    save_figure(fig, path)


def main(argv: Sequence[str]) -> None:
    start(argv, models=(FLAGS.models, MODELS))
    overrides = steps_override(FLAGS.steps)
    report = run(FLAGS.out_dir, models=FLAGS.models, full=FLAGS.full, overrides=overrides)
    print(_markdown(report["final"]))
    print(f"wrote {FLAGS.out_dir}/seq2seq.json, seq2seq.md, seq2seq.png and alignments/")


if __name__ == "__main__":
    flags.DEFINE_string("out_dir", "runs/seq2seq_attention", "Output directory.")
    flags.DEFINE_bool("full", False, "The accelerator-sized configs instead of ':quick'.")
    flags.DEFINE_list("models", list(MODELS), "Models to train.")
    flags.DEFINE_integer("steps", 0, "Override every trial's config.train.steps (0: keep).")
    FLAGS = flags.FLAGS
    app.run(main)
