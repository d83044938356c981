"""experiments/bench_decode.py end to end at tiny sizes: its report and figure, and the
memory it reports for each decode form."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_reports_cache_memory_and_step_time(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "experiments" / "bench_decode.py"),
        "--kernels=dot_product,sliding_window,linear",
        "--lengths=32,128",
        "--window=8",
        "--width=16",
        "--layers=1",
        "--heads=2",
        "--repeats=5",
        f"--out_dir={tmp_path}",
    ]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "bench_decode.json").read_text())["rows"]
    cache = {(r["kernel"], r["length"]): r["cache_bytes_per_sequence"] for r in rows}
    assert cache["dot_product", 128] > 3 * cache["dot_product", 32]  # O(length)
    assert cache["sliding_window", 128] == cache["sliding_window", 32]  # O(window)
    assert cache["linear", 128] == cache["linear", 32]  # O(1)
    assert all(r["ms_per_token"] > 0 for r in rows)
    assert (tmp_path / "bench_decode.md").read_text().count("|") > 10
    assert (tmp_path / "bench_decode.png").stat().st_size > 1000
