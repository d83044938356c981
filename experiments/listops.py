"""ListOps accuracy of a Transformer encoder with several attention kernels, next to the
Long Range Arena paper's ListOps figures (Tay et al. 2021, Table 1).

Each kernel trains ``configs/listops.py`` (``:quick`` on CPU: expressions of 32-128 tokens;
``--full``: LRA's 500-2,000 tokens and model) in ``OUT_DIR/KERNEL`` (reruns skip finished
trials) and is scored on the whole test split. The table also gives the majority-class
accuracy of that test split, the floor every model should beat. Writes ``listops.json``,
``listops.md`` and ``listops.png``::

    python experiments/listops.py                    # CPU: 5 trials of a few minutes
    python experiments/listops.py --full             # accelerator, LRA's lengths
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
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

# kernel -> extra overrides (the sliding window sees 32 tokens on each side).
KERNELS = {
    "dot_product": {},
    "flash": {},
    "sliding_window": {"model.attention_kwargs": {"local_window_size": (32, 32)}},
    "linear": {},
    "performer": {},
}
# kernel -> (the LRA model it corresponds to, its ListOps test accuracy in %), Table 1 of
# Tay et al., "Long Range Arena" (ICLR 2021).
PUBLISHED = {
    "dot_product": ("Transformer", 36.37),
    "flash": ("Transformer (same function)", 36.37),
    "sliding_window": ("Local Attention", 15.82),
    "linear": ("Linear Transformer", 16.13),
    "performer": ("Performer", 18.01),
}


def run(
    out_dir: str | pathlib.Path,
    *,
    kernels: Sequence[str] = tuple(KERNELS),
    full: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains every kernel's model and writes the table; returns the report."""
    out_dir = pathlib.Path(out_dir)
    base = load_config("listops", None if full else "quick")
    trials = {k: {"model.attention": k, **KERNELS[k]} for k in kernels}
    results = run_trials(base, trials, out_dir, overrides)
    accuracy = {k: results[k]["final"].get("accuracy") for k in kernels}
    report = {
        "accuracy": accuracy,
        "majority_class": next(iter(results.values()))["final"].get("majority_class"),
        "published": {k: PUBLISHED[k] for k in kernels},
        "lengths": [base.data.min_length, base.data.max_length],
        "full": full,
    }
    write_outputs(out_dir, "listops", report, _markdown(report))
    _figure(report, out_dir / "listops.png")
    return report


def _markdown(report: dict[str, Any]) -> str:
    low, high = report["lengths"]
    rows = [
        [k, percent(report["accuracy"][k]), *report["published"][k]] for k in report["accuracy"]
    ]
    rows.append(["majority class", percent(report["majority_class"]), "-", "-"])
    text = f"ListOps test accuracy (%), expressions of {low}-{high} tokens:\n\n"
    return text + markdown_table(
        ["kernel", "accuracy", "LRA model", "LRA accuracy (500-2,000 tokens)"], rows
    )


def _figure(report: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    names = list(report["accuracy"])
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ours = [100 * (report["accuracy"][k] or 0.0) for k in names]
    ax.bar(x - 0.2, ours, 0.4, label="attn_jax")
    ax.bar(x + 0.2, [report["published"][k][1] for k in names], 0.4, label="LRA paper")
    ax.axhline(100 * report["majority_class"], color="black", ls="--", label="majority class")
    ax.set_xticks(x, names)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="ListOps")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv: Sequence[str]) -> None:
    start(argv, kernels=(FLAGS.kernels, KERNELS))
    overrides = steps_override(FLAGS.steps)
    report = run(FLAGS.out_dir, kernels=FLAGS.kernels, full=FLAGS.full, overrides=overrides)
    print(_markdown(report))
    print(f"wrote {FLAGS.out_dir}/listops.json, listops.md and listops.png")


if __name__ == "__main__":
    flags.DEFINE_string("out_dir", "runs/listops", "Output directory.")
    flags.DEFINE_bool("full", False, "LRA's lengths and model instead of ':quick'.")
    flags.DEFINE_list("kernels", list(KERNELS), "Attention kernels to compare.")
    flags.DEFINE_integer("steps", 0, "Override every trial's config.train.steps (0: keep).")
    FLAGS = flags.FLAGS
    app.run(main)
