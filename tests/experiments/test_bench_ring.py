"""experiments/bench_ring.py: the longest fitting sequence grows with the ring; outputs."""

from __future__ import annotations

import json

import matplotlib.image

from experiments import bench_ring


def test_longest_sequence_grows_with_the_ring_and_reports_are_written(tmp_path):
    report = bench_ring.run(
        devices=[2, 4],
        budget_mib=2.0,
        lengths=[1024],
        heads=2,
        head_dim=16,
        block=64,
        granule=512,
        limit=1 << 13,
        out_dir=tmp_path,
    )
    two, four = report["rows"]
    assert two["devices"] == 2 and four["devices"] == 4
    assert two["at_longest"]["total"] <= 2.0 and four["at_longest"]["total"] <= 2.0
    # Memory per device is that of the shard: doubling the ring doubles the longest
    # sequence (to the search's granule).
    assert four["longest"] >= 2 * two["longest"] - 512 > 0
    # One step more (the ring of 2's step: 2 x the granule) would not fit.
    over = bench_ring.footprint(
        bench_ring.ring(2, False, 64), two["longest"] + 1024, batch=1, heads=2, head_dim=16
    )
    assert over["total"] > 2.0
    assert four["scratch"][1024] < two["scratch"][1024]
    saved = json.loads((tmp_path / "bench_ring.json").read_text())
    assert saved["rows"][1]["longest"] == four["longest"]
    table = (tmp_path / "bench_ring.md").read_text()
    assert f"| 4 | {four['longest']:,} |" in table and "jax.nn, 1 device" in table
    assert matplotlib.image.imread(tmp_path / "bench_ring.png").shape[0] > 100
