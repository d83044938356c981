"""experiments/bench_models.py at tiny sizes: the flax peer is the same model (same
parameters, same logits, training and decoding), and the report has every contender."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from attn_jax import decode
from experiments import bench_models

CONFIG = {
    "tokens_per_step": 64,
    "width": 16,
    "layers": 1,
    "heads": 2,
    "mlp_dim": 32,
    "vocab": 32,
    "repeats": 5,
    "prompt": 6,
    "cache": 12,
    "decode_repeats": 5,
    "machine": "test",
    "date": "today",
}


def test_the_flax_peer_is_the_same_model():
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CONFIG["vocab"])
    ours = bench_models.build("dot_product", CONFIG, max_len=12)
    params = bench_models.init_params(ours, tokens)
    flax = bench_models.build("flax", CONFIG, max_len=12)
    flax_params = bench_models.init_params(flax, tokens)
    shapes = lambda p: jax.tree.map(jnp.shape, p)
    assert shapes(params) == shapes(flax_params)
    np.testing.assert_allclose(
        flax.apply({"params": params}, tokens),
        ours.apply({"params": params}, tokens),
        atol=1e-5,
    )
    # Decoding: flax's cache one token at a time against our cache after a prefill.
    flax_dec = bench_models.build("flax", CONFIG, max_len=12, decode_mode=True)
    cache = flax_dec.init(jax.random.key(0), jnp.zeros((2, 12), jnp.int32))["cache"]
    for i in range(7):
        flax_logits, state = flax_dec.apply(
            {"params": params, "cache": cache}, tokens[:, i : i + 1], mutable=["cache"]
        )
        cache = state["cache"]
    our_cache = decode.init_cache(ours, jnp.zeros((2, 12), jnp.int32))
    logits, state = ours.apply(
        {"params": params, "cache": our_cache}, tokens[:, :6], decode=True, mutable=["cache"]
    )
    logits, _ = ours.apply(
        {"params": params, "cache": state["cache"]}, tokens[:, 6:7], decode=True, mutable=["cache"]
    )
    np.testing.assert_allclose(flax_logits, logits, atol=1e-5)


def test_every_contender_is_measured_and_reported(tmp_path):
    train = bench_models.measure_training(["flash", "flax"], [16], CONFIG)
    dec = bench_models.measure_decoding(["auto", "flax"], [1], CONFIG)
    for row in train:
        assert row["tokens_per_s"] > 0 and row["peak_bytes"] >= row["temp_bytes"] > 0
        assert row["batch"] * row["length"] == CONFIG["tokens_per_step"]
    assert all(r["prefill_s"] > 0 and r["ms_per_token"] > 0 for r in dec)
    speed = bench_models.ratios(train, "tokens_per_s", "length")
    flash, flax = (r["tokens_per_s"] for r in train)
    assert speed == {("flash", 16): pytest.approx(flash / flax)}
    md = bench_models.markdown(train, dec, CONFIG)
    assert md.count("`flash`") == 1 and md.count("`auto`") == 1 and md.count("`flax`") == 2
    bench_models.plot(train, dec, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
