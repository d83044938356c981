"""Metrics: a console progress line, JSONL, TensorBoard event files and a learning curve."""

from __future__ import annotations

import json
import pathlib
import threading
import time

__all__ = ["PLOT_LOCK", "MetricsWriter", "format_duration", "plot_learning_curve"]

# matplotlib is not thread-safe; trials of a parallel sweep plot from several threads.
PLOT_LOCK = threading.Lock()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class MetricsWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events (tensorboardX) in ``workdir``.

    ``label`` prefixes the console progress line. Each JSONL line is
    ``{"step": s, "split": "train"|"eval", name: value, ...}``.
    """

    def __init__(self, workdir: str | pathlib.Path, total_steps: int, label: str = ""):
        from tensorboardX import SummaryWriter

        self.workdir = pathlib.Path(workdir)
        self.total_steps = total_steps
        self.label = label
        self.jsonl = (self.workdir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))
        self._last_time: float | None = None
        self._last_step: int | None = None

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))
        self.tensorboard.flush()

    def progress(self, step: int, metrics: dict[str, float], tokens_per_step: int) -> str:
        """The console line: step, metrics, steps/s, tokens/s and ETA (also printed)."""
        now = time.perf_counter()
        rate = None
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) / (now - self._last_time)
        self._last_time, self._last_step = now, step
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        if rate:
            eta = format_duration((self.total_steps - step) / rate)
            parts += [
                f"{rate:.2f} steps/s",
                f"{rate * tokens_per_step:,.0f} tokens/s",
                f"ETA {eta}",
            ]
        line = self.label + " | ".join(parts)
        print(line, flush=True)
        return line

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def plot_learning_curve(jsonl: str | pathlib.Path, png: str | pathlib.Path) -> None:
    """Train/eval loss and eval accuracy against step, from ``metrics.jsonl``."""
    with PLOT_LOCK:
        _plot_learning_curve(jsonl, png)


def _plot_learning_curve(jsonl: str | pathlib.Path, png: str | pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in pathlib.Path(jsonl).read_text().splitlines() if line]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if r["split"] == split]
        if rows and "loss" in rows[0]:
            ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=split)
        if rows and "accuracy" in rows[0]:
            ax_acc.plot(
                [r["step"] for r in rows], [r["accuracy"] for r in rows], style, label=split
            )
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
