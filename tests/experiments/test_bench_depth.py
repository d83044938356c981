"""experiments/bench_depth.py at tiny sizes, in process (compiling two training steps): its
rows and table, and the activations that rematerialisation saves."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from experiments import bench_depth, reporting  # noqa: E402

TINY = dict(width=16, heads=2, mlp_dim=32, vocab=32, seq_len=16, batch=2, attention="dot_product")


def test_reports_compile_time_and_memory_per_variant(tmp_path):
    config = {**TINY, "repeats": 1}
    rows = [bench_depth.measure(variant, 3, config) for variant in ("unrolled", "scan+full")]
    unrolled, scanned = rows
    assert (scanned["scan_layers"], scanned["remat"]) == (True, "full")
    assert scanned["temp_bytes"] < unrolled["temp_bytes"]  # only the layers' inputs kept
    assert scanned["argument_bytes"] == unrolled["argument_bytes"]  # the same parameters
    assert all(r["compile_s"] > 0 and r["step_ms"] > 0 for r in rows)
    table = bench_depth.markdown(rows, config)
    assert "| `scan+full` |" in table and "compile s (3 L)" in table
    reporting.write_outputs(tmp_path, "bench_depth", {"config": config, "rows": rows}, table)
    assert json.loads((tmp_path / "bench_depth.json").read_text())["rows"][1]["layers"] == 3


def test_variants_are_a_layout_plus_a_named_policy():
    assert bench_depth.parse_variant("scan+dots") == (True, "dots")
    assert bench_depth.parse_variant("unrolled") == (False, "none")
    with pytest.raises(ValueError, match=r"--variants: 'scan\+nothing_saveable' is not"):
        bench_depth.parse_variant("scan+nothing_saveable")
