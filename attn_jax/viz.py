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

Cross-modal attention over an image's patches (a captioner's weight per patch for each
generated word) is drawn *over the image* by :func:`overlay_figure` / :func:`save_overlay`:
:func:`patches_to_pixels` spreads each patch's weight over its pixels, shown as a heat layer
on the grey image, one panel per word.

Figures are built with matplotlib's object API (no pyplot state and no GUI backend).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "attention_figure",
    "collect_attention",
    "overlay_figure",
    "patches_to_pixels",
    "save_attention",
    "save_overlay",
]


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


def patches_to_pixels(
    weights: np.ndarray, grid: tuple[int, int], image_shape: tuple[int, int]
) -> np.ndarray:
    """Weights per patch spread over the pixels of each patch (block upsampling).

    Args:
      weights: ``[..., rows * cols]``, patches in raster order (row by row, left to right:
        patch ``i`` is at row ``i // cols``, column ``i % cols`` of the grid), as
        :func:`attn_jax.models.patches.embed_patches` orders them.
      grid: ``(rows, cols)`` of the patches.
      image_shape: ``(height, width)``, multiples of ``rows`` and ``cols``.

    Returns:
      ``[..., height, width]``: every pixel of patch ``i`` holds ``weights[..., i]``.
    """
    weights = np.asarray(weights, np.float32)
    rows, cols = grid
    height, width = image_shape
    if weights.shape[-1:] != (rows * cols,):
        raise ValueError(
            f"patches_to_pixels: 'weights' must end in {rows * cols} patches ({rows}x{cols}), "
            f"got shape {weights.shape}"
        )
    if height % rows or width % cols:
        raise ValueError(
            f"patches_to_pixels: image {height}x{width} is not a multiple of the grid {rows}x{cols}"
        )
    blocks = weights.reshape(*weights.shape[:-1], rows, cols)
    return np.repeat(np.repeat(blocks, height // rows, axis=-2), width // cols, axis=-1)


def overlay_figure(
    image: np.ndarray,
    weights: np.ndarray,
    grid: tuple[int, int],
    *,
    words: Sequence[str] | None = None,
    title: str | None = None,
    alpha: float = 0.75,
    cmap: str = "inferno",
    panel_width: float = 6.0,
):
    """A matplotlib ``Figure``: the image once per step, each with that step's attention
    over its patches drawn on top as heat (one panel per generated word).

    Args:
      image: ``[height, width]`` grey image, drawn black ink on white (larger = darker).
      weights: ``[steps, rows * cols]`` (or ``[rows * cols]``) attention over the patches
        in raster order (see :func:`patches_to_pixels`).
      grid: ``(rows, cols)`` of the patches.
      words: one panel title per step (e.g. the generated words).
      title: figure title.
      alpha: opacity of the heat where the weight is largest; it fades to transparent
        with the weight, so unattended pixels show the plain image.
      cmap: colour map of the heat.
      panel_width: inches per panel (the height follows the image's aspect ratio).

    The heat's colour scale is shared by the panels, from 0 to the largest weight.
    """
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    image = np.asarray(image, np.float32)
    if image.ndim != 2:
        raise ValueError(f"overlay_figure: 'image' must be [height, width], got {image.shape}")
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 1:
        weights = weights[None]
    if weights.ndim != 2:
        raise ValueError(
            f"overlay_figure: 'weights' must be [steps, patches], got shape {weights.shape}"
        )
    heat = patches_to_pixels(weights, grid, image.shape)  # [steps, height, width]
    steps = len(heat)
    if words is not None and len(words) != steps:
        raise ValueError(f"overlay_figure: 'words' has {len(words)} entries for {steps} steps")
    height, width = image.shape
    panel_height = panel_width * height / width + 0.35
    fig = Figure(
        figsize=(panel_width + 1.0, panel_height * steps + (0.5 if title else 0.1)),
        layout="constrained",
    )
    axes = fig.subplots(steps, 1, squeeze=False)[:, 0]
    vmax = float(heat.max()) or 1.0
    norm = colors.Normalize(0.0, vmax)
    for step, ax in enumerate(axes):
        ax.imshow(image, cmap="gray_r", vmin=0.0, vmax=max(float(image.max()), 1e-6))
        ax.imshow(
            heat[step],
            cmap=cmap,
            norm=norm,
            alpha=alpha * np.clip(heat[step] / vmax, 0.0, 1.0),
            interpolation="nearest",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        if words is not None:
            ax.set_title(str(words[step]), fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=list(axes), shrink=0.8, label="attention weight")
    return fig


def save_overlay(
    path: str | pathlib.Path,
    image: np.ndarray,
    weights: np.ndarray,
    grid: tuple[int, int],
    **kwargs: Any,
) -> pathlib.Path:
    """Draws :func:`overlay_figure` ``(image, weights, grid, **kwargs)`` and saves it as a
    PNG at ``path`` (parent directories are created). Returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_figure(image, weights, grid, **kwargs).savefig(path, dpi=100)
    return path
