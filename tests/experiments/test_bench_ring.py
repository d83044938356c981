"""experiments/bench_ring.py: the longest fitting sequence grows with the ring; outputs."""

from __future__ import annotations

import json

import matplotlib.image

from experiments import bench_ring


def test_longest_sequence_grows_with_the_ring_and_reports_are_written(tmp_path):
    report = bench_ring.run(
        devices=[1, 4],
        budget_mib=4.0,
        lengths=[1024],
        heads=2,
        head_dim=16,
        block=64,
        granule=256,
        limit=1 << 14,
        out_dir=tmp_path,
    )
    one, four = report["rows"]
    assert one["devices"] == 1 and four["devices"] == 4
    assert one["at_longest"]["total"] <= 4.0 and four["at_longest"]["total"] <= 4.0
    assert four["longest"] >= 3 * one["longest"] > 0
    # One step more would not fit (the search is exact to its granule).
    over = bench_ring.footprint(
        bench_ring.ring(1, False, 64), one["longest"] + 256, batch=1, heads=2, head_dim=16
    )
    assert over["total"] > 4.0
    assert four["scratch"][1024] < one["scratch"][1024]
    saved = json.loads((tmp_path / "bench_ring.json").read_text())
    assert saved["rows"][1]["longest"] == four["longest"]
    table = (tmp_path / "bench_ring.md").read_text()
    assert f"| 4 | {four['longest']:,} |" in table and "jax.nn, 1 device" in table
    assert matplotlib.image.imread(tmp_path / "bench_ring.png").shape[0] > 100
