"""The kernel demo behind ``launch.py``."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from attn_jax import demo, kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_checks_every_kernel_against_the_reference():
    rows = demo.run_demo(batch=1, seq_len=16)
    assert [r.name for r in rows] == kernels.available()
    for row in rows:
        if row.note:  # a kernel with an interface the demo does not know
            continue
        assert row.max_error is not None and row.max_error >= 0, row
        if row.exact:  # approximate kernels (linear, performer) compute something else
            assert row.max_error < 1e-4, row
        assert row.milliseconds is not None and row.milliseconds > 0
    table = demo.format_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "| dot_product | dot_product | True |" in table


def _launch(*args: str, default: bool = False) -> subprocess.CompletedProcess:
    """``launch.py`` with the kernel demo config, or with no ``--config`` (``default``)."""
    if not default and not any(a.startswith("--config=") for a in args):
        args = (f"--config={ROOT}/configs/kernel_demo.py", *args)
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        capture_output=True,
        text=True,
        cwd="/",  # the default config is found relative to launch.py, not the cwd
        timeout=120,
    )


def test_the_default_config_is_the_mqar_experiment():
    result = _launch("--config.data.num_kv_pairs=40", default=True)
    assert result.returncode == 2 and "config.data.seq_len" in result.stderr, result.stderr


def test_launch_runs_the_kernel_demo_with_overrides():
    result = _launch("--config.kernels=dot_product,pooling", "--config.seq_len=8")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["dot_product", "pooling"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.kernels=dot_product,nope"], "config.kernels: unknown kernel(s) nope"),
        (["--config.batch=0"], "config.batch: expected a positive integer"),
        (["--config.dtype=float8"], "config.dtype: expected one of"),
        (["--config.nokey=3"], "--config.nokey: no such key in the config"),
        (["--config.batch=abc"], "--config.batch=abc"),
        (["--config=configs/missing.py"], "No such file or directory"),
        ([f"--config={ROOT}/configs/kernel_demo.py:fast"], "unknown config argument 'fast'"),
        ([f"--config={ROOT}/configs/kernel_demo.py:seq_len=x"], "'seq_len' expects an integer"),
        (["--nosuchflag"], "nosuchflag"),
    ],
)
def test_launch_bad_input_is_one_line_and_exit_code_2(args, message):
    result = _launch(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
