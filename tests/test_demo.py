"""The kernel demo behind ``launch.py``."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from attn_jax import demo, kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_checks_every_kernel_against_the_reference():
    rows = demo.run_demo(batch=1, seq_len=16)
    assert [r.name for r in rows] == kernels.available()
    for row in rows:
        if row.note:  # a kernel with an interface the demo does not know
            continue
        assert row.max_error is not None and row.max_error < 1e-4, row
        assert row.milliseconds is not None and row.milliseconds > 0
    table = demo.format_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "| dot_product | dot_product | True |" in table


def test_launch_rejects_unknown_kernel_names():
    result = subprocess.run(
        [sys.executable, "launch.py", "--kernels=dot_product,nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--kernels: unknown kernel(s) nope" in result.stderr + result.stdout
