"""SCAN exact-match table: LSTM seq2seq with additive / multiplicative / no attention and the
Transformer encoder-decoder, on the simple, length and add-primitive-jump splits, next to
the best results of Lake & Baroni (2018).

Each (model, split) trains ``configs/scan_rnn.py`` or ``configs/scan_transformer.py``
(``:quick`` on CPU, the full variant with ``--full``) in ``OUT_DIR/MODEL/SPLIT`` (a rerun
skips finished trials and resumes interrupted ones), then greedily decodes the whole test
split. Writes ``scan.json``, ``scan.md`` (overall, and by action-sequence length) and
``scan.png``::

    python experiments/scan_table.py                       # CPU: 12 trials of ~3-5 minutes
    python experiments/scan_table.py --full --out_dir=runs/scan_full   # accelerator
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from attn_jax.data import scan
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

SPLITS = scan.SPLITS
# name -> (config file, overrides)
MODELS = {
    "lstm_additive": ("scan_rnn", {"model.attention": "additive"}),
    "lstm_multiplicative": ("scan_rnn", {"model.attention": "multiplicative"}),
    "lstm_none": ("scan_rnn", {"model.attention": "none"}),
    "transformer": ("scan_transformer", {}),
}
PUBLISHED = scan.PUBLISHED_EXACT_MATCH  # best of Lake & Baroni (2018), percent


def run(
    out_dir: str | pathlib.Path,
    *,
    models: Sequence[str] = tuple(MODELS),
    splits: Sequence[str] = SPLITS,
    full: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains and evaluates every (model, split); returns and writes the tables."""
    out_dir = pathlib.Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        config_name, model_overrides = MODELS[model]
        base = load_config(config_name, None if full else "quick")
        trials = {split: {**model_overrides, "data.split": split} for split in splits}
        results[model] = run_trials(base, trials, out_dir / model, overrides)
    table = {model: {split: results[model][split]["final"] for split in splits} for model in models}
    report = {"exact_match": table, "published_best": PUBLISHED, "full": full}
    write_outputs(out_dir, "scan", report, _markdown(table, splits))
    _figure(table, splits, out_dir / "scan.png")
    return report


def _exact(final: dict[str, Any]) -> float | None:
    return final.get("exact_match") if final else None


def _markdown(table: dict[str, dict[str, Any]], splits: Sequence[str]) -> str:
    rows = [[m, *(percent(_exact(table[m][s])) for s in splits)] for m in table]
    rows.append(["best of Lake & Baroni (2018)", *(f"{PUBLISHED[s]:.1f}" for s in splits)])
    text = "Test exact match (%), greedy decoding of the whole test split:\n\n"
    text += markdown_table(["model", *splits], rows)
    if "length" in splits:
        buckets = [b["bucket"] for b in next(iter(table.values()))["length"].get("buckets", [])]
        by_length = [
            [m, *(percent(b["exact_match"]) for b in table[m]["length"].get("buckets", []))]
            for m in table
        ]
        text += "\nLength split, exact match (%) by number of actions in the target:\n\n"
        text += markdown_table(["model", *buckets], by_length)
    return text


def _figure(table: dict[str, dict[str, Any]], splits: Sequence[str], path: pathlib.Path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / (len(table) + 1)
    for i, (model, by_split) in enumerate(table.items()):
        values = [100 * (_exact(by_split[s]) or 0.0) for s in splits]
        ax.bar([j + i * width for j in range(len(splits))], values, width, label=model)
    ax.bar(
        [j + len(table) * width for j in range(len(splits))],
        [PUBLISHED[s] for s in splits],
        width,
        label="best published",
        color="black",
        alpha=0.6,
    )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], list(splits))
    ax.set(ylabel="test exact match (%)", ylim=(0, 105), title="SCAN")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv: Sequence[str]) -> None:
    start(argv, models=(FLAGS.models, MODELS), splits=(FLAGS.splits, SPLITS))
    overrides = steps_override(FLAGS.steps)
    report = run(
        FLAGS.out_dir,
        models=FLAGS.models,
        splits=FLAGS.splits,
        full=FLAGS.full,
        overrides=overrides,
    )
    print(_markdown(report["exact_match"], FLAGS.splits))
    print(f"wrote {FLAGS.out_dir}/scan.json, scan.md and scan.png")


if __name__ == "__main__":
    flags.DEFINE_string("out_dir", "runs/scan_table", "Output directory (one run per trial).")
    flags.DEFINE_bool("full", False, "The accelerator-sized configs instead of ':quick'.")
    flags.DEFINE_list("models", list(MODELS), "Models to train.")
    flags.DEFINE_list("splits", list(SPLITS), "SCAN splits.")
    flags.DEFINE_integer("steps", 0, "Override every trial's config.train.steps (0: keep).")
    FLAGS = flags.FLAGS
    app.run(main)
