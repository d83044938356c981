"""Attention heatmaps: labels on both axes, head grids, PNG files, collected weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from attn_jax import models, viz


def _labels(ax):
    return [t.get_text() for t in ax.get_xticklabels()], [
        t.get_text() for t in ax.get_yticklabels()
    ]


def test_heatmap_has_token_labels_on_both_axes_and_writes_a_readable_png(tmp_path):
    source, target = ["ein", "und", "zwanzig"], ["twenty", "-", "one", "<eos>"]
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=4)  # [q=4, kv=3]
    fig = viz.attention_figure(weights, x_labels=source, y_labels=target, x_name="source")
    ax = fig.axes[0]
    assert _labels(ax) == (source, target)
    assert ax.get_xlabel() == "source" and ax.get_ylabel() == "query"
    np.testing.assert_allclose(ax.images[0].get_array(), weights, rtol=1e-6)

    path = viz.save_attention(tmp_path / "sub" / "alignment.png", weights, x_labels=source)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_grid_draws_the_chosen_heads_with_titles():
    weights = np.random.default_rng(1).random((6, 5, 5))
    fig = viz.attention_figure(weights, heads=[1, 4, 5], columns=2)
    drawn = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in drawn] == ["head 1", "head 4", "head 5"]
    np.testing.assert_allclose(drawn[1].images[0].get_array(), weights[4], rtol=1e-6)


def test_long_sequences_label_every_kth_token():
    labels = [f"t{i}" for i in range(200)]
    fig = viz.attention_figure(np.ones((200, 200)) / 200, x_labels=labels, y_labels=labels)
    shown, _ = _labels(fig.axes[0])
    assert 20 < len(shown) <= 64 and shown[0] == "t0" and shown[1] == labels[4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": np.ones((2, 3, 4, 5))}, "'weights' must be"),
        ({"weights": np.ones((3, 4)), "x_labels": ["a"]}, "'x_labels' has 1 labels for 4"),
        ({"weights": np.ones((2, 3, 4)), "heads": [2]}, "'heads' must be in"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        viz.attention_figure(**kwargs)


def test_collect_attention_names_every_layer_of_a_sowing_model():
    options = models.TransformerOptions(width=16, num_layers=2, num_heads=2, mlp_dim=32)
    model = models.TransformerLM(11, options)
    tokens = jnp.ones((3, 7), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    _, state = model.apply({"params": params}, tokens, sow_weights=True, mutable=["intermediates"])
    layers = viz.collect_attention(state["intermediates"])
    assert list(layers) == ["layer_0/attention", "layer_1/attention"]
    assert layers["layer_0/attention"].shape == (3, 2, 7, 7)
    np.testing.assert_allclose(layers["layer_1/attention"].sum(-1), 1.0, rtol=1e-5)
