"""experiments/bench_features.py: its contenders compute the same attention; the hidden
fraction of the block-sparsity pattern; the report's tables."""

from __future__ import annotations

import jax
import numpy as np

from experiments import bench_features


def test_the_pattern_in_every_form_gives_the_same_attention():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 256, 2, 8)) for i in range(3))
    outs = [fn(q, k, v) for fn in bench_features.sparsity_contenders(256, 32).values()]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-5)
    costs = bench_features.cost_contenders(2)
    assert set(costs) == {"flash", *bench_features.FEATURES}
    base = costs["flash"](q, k, v)
    for name in bench_features.FEATURES:
        assert not np.allclose(costs[name](q, k, v), base), name


def test_hidden_fraction_counts_the_blocks_off_the_document_diagonal():
    # 8 documents of 64 tokens, blocks of 32 x 32: 16 x 16 blocks, 32 shown.
    assert bench_features.hidden_fraction(512, 64, 32, 32) == 1 - 32 / 256


def test_markdown_reports_ratios():
    timing = lambda s: {"forward": {"seconds": s}, "forward_backward": {"seconds": 3 * s}}
    sparse = dict(zip(bench_features.sparsity_contenders(64, 8), (1, 2, 6, 9), strict=True))
    report = {
        "device": "cpu",
        "doc_len": 820,
        "sparse_len": 8192,
        "hidden_fraction": 0.9,
        "heads": 4,
        "head_dim": 64,
        "cost_len": 4096,
        "sparsity": {name: timing(s) for name, s in sparse.items()},
        "scratch_half_and_full": {
            "flash mask_fn": [1 << 20, 2 << 20],
            "flash dense mask": [4 << 20, 16 << 20],
        },
        "cost": {
            n: timing(1.0 if n == "flash" else 1.1) for n in ("flash", *bench_features.FEATURES)
        },
        "accuracy": [
            dict(feature="sinks", kernel="flash", dtype="float32", forward=1e-7, gradient=2e-7)
        ],
    }
    text = bench_features.markdown(report)
    assert "| flash dense bias (every block) | 6000 | 18000 | 6.00x | 6.00x |" in text
    assert "| flash dense mask | 4.0 | 16.0 | 4.00x |" in text
    assert "| sinks | 1100 | 3300 | 1.10x | 1.10x |" in text
