"""MQAR accuracy for every attention kernel across model widths and sequence lengths, to
compare with Figure 2 of Zoology (Arora et al. 2023): softmax attention solves multi-query
associative recall (~0.98+) at every width and length, while the other model classes fall
as sequences grow at small widths.

Each (length, width, kernel, learning rate) trains ``configs/mqar.py`` (2 attention-only
layers with rotary positions, one head; the same recipe at every width) in
``OUT_DIR/L{length}/{kernel}_w{width}_lr{lr}`` (reruns skip finished trials and resume
interrupted ones, so a grid can run across sittings); as in Zoology a cell reports the
best final eval accuracy over the learning rates. The CPU grid covers lengths 64 and 128
(4 and 8 key-value pairs) at widths 64, 128 and 256 for ``dot_product``, ``linear``,
``performer`` and ``sliding_window`` (the config's 2,000 steps of batch 32; learning rates
3e-3 and 1e-2, for the hidden matrices scaled by ``64 / width``: muP's rule, the
config's ``optim.lr_reference_width``; trials are named by the unscaled rate); ``--full``
is the Zoology-sized grid for an accelerator: lengths 64/128/256/512 with 4/8/16/64
pairs, widths 64-512, batch 512 for 64 epochs, learning rates 3e-4/1e-3/3e-3, every
``dot_product`` kernel.
Writes ``mqar.json``, ``mqar.md`` and ``mqar.png``::

    python experiments/mqar_table.py                      # CPU: 48 trials, hours
    python experiments/mqar_table.py --full --out_dir=runs/mqar_full
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from experiments.reporting import (
    load_config,
    markdown_table,
    run_trials,
    save_figure,
    start,
    steps_override,
    write_outputs,
)

KV_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}  # Zoology's pairs per sequence length
GRIDS = {
    "cpu": {
        "lengths": [64, 128],
        "widths": [64, 128, 256],
        "learning_rates": [3e-3, 1e-2],
        "kernels": ["dot_product", "linear", "performer", "sliding_window"],
    },
    "full": {
        "lengths": [64, 128, 256, 512],
        "widths": [64, 128, 256, 512],
        "learning_rates": [3e-4, 1e-3, 3e-3],
        "kernels": None,  # every dot_product kernel that runs here (default_kernels)
    },
}


def kernel_overrides(kernel: str, length: int) -> dict[str, Any]:
    """Per-kernel settings: the sliding window sees the last ``length // 4`` tokens."""
    overrides: dict[str, Any] = {"model.attention": kernel}
    if kernel == "sliding_window":
        overrides["model.attention_kwargs"] = {"local_window_size": (length // 4, 0)}
    return overrides


def default_kernels() -> list[str]:
    """Every ``dot_product`` kernel; Pallas kernels only on GPU (on CPU they run in the
    Pallas interpreter, far too slow to train with); ``ring`` only with several local
    devices (on one it is a single-device blockwise kernel: ``flash``'s function)."""
    import jax

    from attn_jax import kernels

    names = kernels.available(interface="dot_product")
    if jax.default_backend() != "gpu":
        names = [n for n in names if not n.startswith("pallas")]
    if jax.local_device_count() == 1:
        names = [n for n in names if n != "ring"]
    return names


def run(
    out_dir: str | pathlib.Path,
    *,
    kernels: Sequence[str],
    lengths: Sequence[int],
    widths: Sequence[int],
    learning_rates: Sequence[float],
    full: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains every grid point and writes the table; returns the report."""
    out_dir = pathlib.Path(out_dir)
    base = load_config("mqar", "full" if full else None)
    best: dict[int, dict[str, dict[int, float | None]]] = {}
    by_lr: dict[int, dict[str, dict[int, dict[float, float | None]]]] = {}
    for length in lengths:
        trials = {
            f"{kernel}_w{width}_lr{lr:g}": {
                "data.seq_len": length,
                "data.num_kv_pairs": KV_PAIRS[length],
                "model.width": width,
                "optim.learning_rate": lr,
                **kernel_overrides(kernel, length),
            }
            for kernel in kernels
            for width in widths
            for lr in learning_rates
        }
        results = run_trials(base, trials, out_dir / f"L{length}", overrides)
        by_lr[length] = {
            kernel: {
                width: {
                    lr: results[f"{kernel}_w{width}_lr{lr:g}"]["eval"].get("accuracy")
                    for lr in learning_rates
                }
                for width in widths
            }
            for kernel in kernels
        }
        best[length] = {
            kernel: {width: _best(accuracy.values()) for width, accuracy in by_width.items()}
            for kernel, by_width in by_lr[length].items()
        }
    report = {
        "accuracy": best,
        "accuracy_by_learning_rate": by_lr,
        "kv_pairs": {length: KV_PAIRS[length] for length in lengths},
        "learning_rates": list(learning_rates),
        "full": full,
    }
    write_outputs(out_dir, "mqar", report, _markdown(best))
    _figure(best, out_dir / "mqar.png")
    return report


def _best(values) -> float | None:
    finite = [v for v in values if v is not None and v == v]
    return max(finite) if finite else None


def _markdown(best: dict[int, dict[str, dict[int, float | None]]]) -> str:
    text = ""
    for length, by_kernel in best.items():
        widths = list(next(iter(by_kernel.values())))
        text += (
            f"\nMQAR eval query accuracy, sequence length {length}, {KV_PAIRS[length]} "
            "key-value pairs (best over learning rates):\n\n"
        )
        rows = [
            [k, *("-" if v is None else f"{v:.3f}" for v in by_width.values())]
            for k, by_width in by_kernel.items()
        ]
        text += markdown_table(["kernel", *(f"width {w}" for w in widths)], rows)
    return text.lstrip()


def _figure(best: dict[int, dict[str, dict[int, float | None]]], path: pathlib.Path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(best), 3.6), layout="constrained")
    axes = fig.subplots(1, len(best), squeeze=False)[0]
    for ax, (length, by_kernel) in zip(axes, best.items(), strict=True):
        for kernel, by_width in by_kernel.items():
            widths = list(by_width)
            values = [float("nan") if v is None else v for v in by_width.values()]
            ax.plot(widths, values, "o-", label=kernel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set(
            xlabel="model width",
            ylabel="accuracy",
            ylim=(0, 1.02),
            title=f"length {length}, {KV_PAIRS[length]} pairs",
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("MQAR (compare Zoology, Figure 2)")
    save_figure(fig, path)


def main(argv: Sequence[str]) -> None:
    from attn_jax import kernels as registry

    grid = GRIDS["full" if FLAGS.full else "cpu"]
    kernels = FLAGS.kernels or grid["kernels"] or default_kernels()
    lengths = [int(n) for n in FLAGS.lengths] if FLAGS.lengths else grid["lengths"]
    start(
        argv,
        kernels=(kernels, registry.available(interface="dot_product")),
        lengths=(lengths, KV_PAIRS),
    )
    widths = [int(w) for w in FLAGS.widths] if FLAGS.widths else grid["widths"]
    rates = [float(r) for r in FLAGS.learning_rates] or grid["learning_rates"]
    overrides = steps_override(FLAGS.steps)
    report = run(
        FLAGS.out_dir,
        kernels=kernels,
        lengths=lengths,
        widths=widths,
        learning_rates=rates,
        full=FLAGS.full,
        overrides=overrides,
    )
    print(_markdown(report["accuracy"]))
    print(f"wrote {FLAGS.out_dir}/mqar.json, mqar.md and mqar.png")


if __name__ == "__main__":
    flags.DEFINE_string("out_dir", "runs/mqar_table", "Output directory.")
    flags.DEFINE_bool("full", False, "The Zoology-sized grid (accelerator) instead of CPU's.")
    flags.DEFINE_list("kernels", None, "Kernels (default: the grid's; --full: every one).")
    flags.DEFINE_list("lengths", None, "Sequence lengths (default: the grid's).")
    flags.DEFINE_list("widths", None, "Model widths (default: the grid's).")
    flags.DEFINE_list("learning_rates", [], "Learning rates (default: the grid's).")
    flags.DEFINE_integer("steps", 0, "Override every trial's config.train.steps (0: keep).")
    FLAGS = flags.FLAGS
    app.run(main)
