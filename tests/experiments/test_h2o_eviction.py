"""experiments/h2o_eviction.py: a budget as long as the sequence changes nothing; the
report is written."""

from __future__ import annotations

import json

from experiments import h2o_eviction


def test_a_budget_of_the_whole_sequence_equals_the_full_cache(tmp_path):
    report = h2o_eviction.run(
        seq_len=12, steps=20, batch=8, budgets=[12, 3], recent=2, num_eval=32, out_dir=tmp_path
    )
    whole, small = report["rows"]
    assert whole["h2o"] == whole["recent_only"] == report["full_cache_accuracy"]
    assert 0.0 <= small["h2o"] <= 1.0 and 0.0 <= small["recent_only"] <= 1.0
    saved = json.loads((tmp_path / "h2o.json").read_text())
    assert saved["rows"][1]["budget"] == 3
    assert "| 3 |" in (tmp_path / "h2o.md").read_text()
