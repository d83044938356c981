"""The benchmark harness: report fields, ratios, memory skipping, outputs (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_kernels", ROOT / "experiments" / "bench_kernels.py"
)
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)


def _config(**overrides):
    config = {
        "kernels": ["jax.nn.xla", "flax", "flash", "linear"],
        "seq_lens": [32, 64],
        "head_dims": [16],
        "causal": [True],
        "dtypes": ["float32"],
        "modes": ["forward", "forward_backward"],
        "batch": 1,
        "heads": 2,
        "window": 8,
        "repeats": 5,
        "memory_fraction": 0.8,
    }
    return {**config, **overrides}


def test_report_has_times_flops_memory_and_ratios():
    report = bench_kernels.run(_config())
    assert report["matmul_gflops"] > 0 and report["machine"]
    rows = report["rows"]
    assert len(rows) == 4 * 2 * 2
    assert all(r["status"] == "ok" and r["seconds"] > 0 and r["gflops"] > 0 for r in rows)
    baseline = [r for r in rows if r["kernel"] == "jax.nn.xla"]
    assert all(r["speedup_vs_jax_nn"] == pytest.approx(1.0) for r in baseline)
    flash = next(r for r in rows if r["kernel"] == "flash" and r["mode"] == "forward_backward")
    assert flash["scratch_bytes"] > 0 and "scratch_vs_jax_nn" in flash
    table = bench_kernels.markdown(report)
    assert table.count("\n| flash |") == 4


def test_flops_follow_the_flashattention_convention():
    full = bench_kernels.attention_flops(1, 8, 1024, 64, False, "forward")
    assert full == 4 * 8 * 1024 * 1024 * 64
    assert bench_kernels.attention_flops(1, 8, 1024, 64, True, "forward") == full / 2
    assert bench_kernels.attention_flops(1, 8, 1024, 64, False, "forward_backward") == 3.5 * full


def test_programs_that_do_not_fit_are_skipped_not_run():
    report = bench_kernels.run(_config(kernels=["jax.nn.xla"], memory_fraction=1e-12))
    assert [r["status"] for r in report["rows"]] == ["skipped"] * 2  # first length per setting


def test_command_line_writes_json_markdown_and_plots(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "experiments" / "bench_kernels.py"),
        "--kernels=jax.nn.xla,flash",
        "--seq_lens=32,64",
        "--head_dims=16",
        "--heads=2",
        "--causal=false",
        "--dtypes=float32",
        f"--out_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["kernel"] for r in report["rows"]} == {"jax.nn.xla", "flash"}
    assert "| flash |" in (tmp_path / "bench.md").read_text()
    for png in ("bench_time.png", "bench_memory.png"):
        assert (tmp_path / png).stat().st_size > 0
    bad = subprocess.run(
        [*command[:2], "--repeats=2"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert bad.returncode != 0 and "--repeats" in bad.stderr


def test_contenders_take_turns_in_alternating_order():
    calls = []
    runs = [lambda name=name: calls.append(name) for name in "abc"]
    seconds = bench_kernels.time_in_turn(runs, repeats=3)
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc"  # warm-up, then three rounds
