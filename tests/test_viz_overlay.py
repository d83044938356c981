"""Attention over an image: weights per patch land on the pixels of that patch, one panel
per word, a PNG file."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from attn_jax import viz

GRID, SHAPE = (2, 12), (8, 48)  # 4x4 patches of a 6-digit strip


@pytest.mark.parametrize("patch", [0, 5, 12, 23])
def test_one_hot_attention_lights_exactly_its_patch(patch):
    weights = np.zeros(24, np.float32)
    weights[patch] = 1.0
    pixels = viz.patches_to_pixels(weights, GRID, SHAPE)
    row, col = divmod(patch, GRID[1])  # raster order: patch = row * cols + col
    expected = np.zeros(SHAPE, np.float32)
    expected[4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 1.0
    np.testing.assert_array_equal(pixels, expected)


def test_leading_axes_are_kept_and_bad_shapes_raise():
    weights = np.random.default_rng(0).random((3, 24))
    pixels = viz.patches_to_pixels(weights, GRID, SHAPE)
    assert pixels.shape == (3, *SHAPE)
    np.testing.assert_allclose(pixels.reshape(3, 2, 4, 12, 4).mean((2, 4)).reshape(3, 24), weights)
    with pytest.raises(ValueError, match="must end in 24 patches"):
        viz.patches_to_pixels(weights[:, :20], GRID, SHAPE)
    with pytest.raises(ValueError, match="not a multiple of the grid"):
        viz.patches_to_pixels(weights, GRID, (8, 50))


def test_overlay_draws_one_panel_per_word_over_the_image_and_writes_a_png(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random(SHAPE).astype(np.float32)
    weights = rng.dirichlet(np.ones(24), size=3).astype(np.float32)
    words = ["seven", "two", "<eos>"]
    fig = viz.overlay_figure(image, weights, GRID, words=words, title="strip")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == words
    for step, ax in enumerate(panels):
        grey, heat = ax.images
        np.testing.assert_array_equal(grey.get_array(), image)
        np.testing.assert_allclose(
            heat.get_array(), viz.patches_to_pixels(weights[step], GRID, SHAPE), rtol=1e-6
        )
    with pytest.raises(ValueError, match="'words' has 2 entries for 3 steps"):
        viz.overlay_figure(image, weights, GRID, words=words[:2])
    path = viz.save_overlay(tmp_path / "sub" / "overlay.png", image, weights, GRID, words=words)
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture[..., :3].std() > 0.05
