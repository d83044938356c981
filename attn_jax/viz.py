"""Pictures of attention: heatmaps of recorded weights, token labels on both axes, head grids.

Models record weights with ``sow_weights=True`` (``mutable=["intermediates"]``);
:func:`collect_attention` flattens what they sowed into ``{layer name: [batch, heads, q, kv]}``
and :func:`save_attention` draws one example's heads of one layer as a PNG::

    logits, state = model.apply(
        {"params": params}, tokens, sow_weights=True, mutable=["intermediates"]
    )
    layers = viz.collect_attention(state["intermediates"])  # {"layer_0/attention": ...}
    viz.save_attention(
        "layer0.png", layers["layer_0/attention"][0], x_labels=words, y_labels=words
    )

Figures are built with matplotlib's object API (no pyplot state and no GUI backend).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["attention_figure", "collect_attention", "save_attention"]


def collect_attention(intermediates: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every sowed ``attention_weights`` entry, keyed by its module path.

    Args:
      intermediates: the ``'intermediates'`` collection of a ``sow_weights=True`` call.

    Returns:
      ``{"encoder/layer_0/attention": weights [batch, heads, q_len, kv_len], ...}`` in the
      order the modules ran (the RNN's alignments have one head).
    """
    found: dict[str, np.ndarray] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if key == "attention_weights":
                found["/".join(path)] = np.asarray(value[0], np.float32)
            elif isinstance(value, Mapping):
                walk(value, (*path, key))

    walk(intermediates, ())
    return found


def _tick_positions(count: int, max_labels: int) -> np.ndarray:
    step = max(1, int(np.ceil(count / max_labels)))
    return np.arange(0, count, step)


def attention_figure(
    weights: np.ndarray,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
    x_name: str = "key",
    y_name: str = "query",
    columns: int = 4,
    max_labels: int = 64,
):
    """A matplotlib ``Figure`` of attention heatmaps, one panel per head.

    Args:
      weights: ``[q_len, kv_len]`` (one head) or ``[heads, q_len, kv_len]``.
      x_labels / y_labels: token labels of the keys (columns) and queries (rows); with
        more than ``max_labels`` tokens every k-th one is labelled.
      heads: which heads to draw (default: all), each in its own panel titled "head h".
      title: figure title.
      x_name / y_name: axis names (e.g. "source" / "target" for seq2seq alignments).
      columns: panels per row.

    The colour scale is shared by the panels, from 0 to the largest weight shown.
    """
    from matplotlib.figure import Figure

    weights = np.asarray(weights, np.float32)
    if weights.ndim == 2:
        weights = weights[None]
    if weights.ndim != 3:
        raise ValueError(
            f"attention_figure: 'weights' must be [q_len, kv_len] or [heads, q_len, kv_len], "
            f"got shape {weights.shape}"
        )
    num_heads, q_len, kv_len = weights.shape
    for name, labels, size in (("x_labels", x_labels, kv_len), ("y_labels", y_labels, q_len)):
        if labels is not None and len(labels) != size:
            raise ValueError(
                f"attention_figure: '{name}' has {len(labels)} labels for {size} tokens"
            )
    heads = list(range(num_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad or not heads:
        raise ValueError(f"attention_figure: 'heads' must be in [0, {num_heads}), got {heads}")
    columns = min(columns, len(heads))
    rows = -(-len(heads) // columns)
    cell = max(2.5, min(5.5, 0.12 * max(q_len, kv_len) + 1.5))
    fig = Figure(
        figsize=(cell * columns + 1.0, cell * rows + (0.6 if title else 0.2)),
        layout="constrained",
    )
    axes = fig.subplots(rows, columns, squeeze=False)
    vmax = float(weights[heads].max()) or 1.0
    image = None
    for panel, ax in enumerate(axes.flat):
        if panel >= len(heads):
            ax.set_axis_off()
            continue
        head = heads[panel]
        image = ax.imshow(weights[head], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        for axis, labels, size in ((ax.xaxis, x_labels, kv_len), (ax.yaxis, y_labels, q_len)):
            ticks = _tick_positions(size, max_labels)
            axis.set_ticks(ticks)
            if labels is None:
                axis.set_ticklabels([str(t) for t in ticks])
            else:
                axis.set_ticklabels([str(labels[t]) for t in ticks])
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
        if len(heads) > 1 or num_heads > 1:
            ax.set_title(f"head {head}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    return fig


def save_attention(path: str | pathlib.Path, weights: np.ndarray, **kwargs: Any) -> pathlib.Path:
    """Draws :func:`attention_figure` ``(weights, **kwargs)`` and saves it as a PNG at ``path``
    (parent directories are created). Returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = attention_figure(weights, **kwargs)
    fig.savefig(path, dpi=100)
    return path
