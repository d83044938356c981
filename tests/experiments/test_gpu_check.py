"""experiments/gpu_check.py on CPU at tiny sizes: rows, FLOP math, failures recorded, the
time limit, a crashing kernel's process replaced, and the conformance run's per-kernel
summary (its pytest plugin included)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import pathlib
import textwrap

import pytest
from absl import flags

from attn_jax import kernels

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

BROKEN = "gpu_check_broken"


@pytest.fixture
def broken_kernel():
    """A registered ``dot_product`` kernel that fails whenever it is traced."""

    @kernels.register(BROKEN, capabilities={"causal"})
    def broken(call):
        raise RuntimeError("planted failure")

    yield BROKEN
    kernels.unregister(BROKEN)


def _main(tmp_path, monkeypatch, *args, isolate=False):
    """``main`` with these flags (benchmark in this process unless ``isolate``)."""
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")  # run() sets a default
    values = flags.FlagValues()
    gpu_check.define_flags(values)
    values(["gpu_check", f"--out_dir={tmp_path}", f"--isolate={isolate}", *args])
    return gpu_check.main(["gpu_check"], values)


def test_cpu_smoke_run_records_every_case(tmp_path, monkeypatch, capsys, broken_kernel):
    names = ["dot_product", "jax.nn.xla", "jax.nn.cudnn", broken_kernel]
    report = _main(
        tmp_path,
        monkeypatch,
        "--seq_lens=64",
        "--head_dims=16",
        "--tokens=128",
        "--hidden=32",
        "--causal=true",
        f"--kernels={','.join(names)}",
        "--skip_conformance",
    )
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = saved["rows"]
    assert [(r["kernel"], r["mode"]) for r in rows] == [
        (name, mode) for mode in ("forward", "forward_backward") for name in names
    ]
    status = {(r["kernel"], r["mode"]): r for r in rows}
    for mode in ("forward", "forward_backward"):
        assert status[("dot_product", mode)]["status"] == "ok"
        assert status[("jax.nn.xla", mode)]["status"] == "ok"
        cudnn = status[("jax.nn.cudnn", mode)]
        assert cudnn["status"] == "unsupported" and "GPU" in cudnn["error"]
        broken = status[(broken_kernel, mode)]
        assert broken["status"] == "failed" and "planted failure" in broken["error"]
    # batch = 128 // 64 = 2, heads = 32 // 16 = 2; causal halves 4 * B * H * N^2 * D and
    # the backward pass adds 2.5x the forward.
    forward_flops = 4 * 2 * 2 * 64 * 64 * 16 / 2
    for r in rows:
        if r["status"] == "ok":
            assert (r["batch"], r["heads"], r["causal"]) == (2, 2, True)
            flops = forward_flops * (3.5 if r["mode"] == "forward_backward" else 1)
            assert r["tflops"] == pytest.approx(flops / r["seconds"] / 1e12, rel=1e-9)
    assert saved["device"] and saved["jax"] and saved["date"]
    assert saved["conformance"]["status"] == "skipped" and saved["complete"]
    assert report["rows"] == rows
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| forward | 16 | yes | dot_product |" in table
    assert f"`{broken_kernel}` failed in 2 case(s)" in table
    printed = capsys.readouterr().out
    assert "# GPU check" in printed and "| forward_backward | 16 | yes | jax.nn.xla |" in printed
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "gpu_check.png").stat().st_size > 0
    assert len(list(tmp_path.iterdir())) <= 8


def test_tflops_follow_the_flashattention_convention():
    full = gpu_check.tflops(2, 16, 1024, 64, False, "forward", seconds=1e-3)
    assert full == pytest.approx(4 * 2 * 16 * 1024 * 1024 * 64 / 1e-3 / 1e12)  # 8.59
    assert gpu_check.tflops(2, 16, 1024, 64, True, "forward", 1e-3) == pytest.approx(full / 2)
    both = gpu_check.tflops(2, 16, 1024, 64, False, "forward_backward", 1e-3)
    assert both == pytest.approx(3.5 * full)
    assert gpu_check.problem_size(1024, 64, tokens=16384, hidden=2048) == (16, 32)
    assert gpu_check.problem_size(32768, 128, tokens=16384, hidden=2048) == (1, 16)


def test_time_limit_skips_the_cases_left_and_says_so(tmp_path, monkeypatch, capsys):
    report = _main(
        tmp_path,
        monkeypatch,
        "--seq_lens=64,128",
        "--head_dims=16",
        "--hidden=32",
        "--kernels=dot_product",
        "--skip_conformance",
        "--time_limit_s=0",
    )
    assert len(report["rows"]) == 2 * 2 * 2  # N x causal x mode
    assert all(r["status"] == "skipped" and "time limit" in r["error"] for r in report["rows"])
    out = capsys.readouterr().out
    assert out.count("skipping the 8 cases left") == 1
    assert "The time limit was reached: 8 case(s) not run" in out


def test_unknown_kernel_and_bad_flags_are_usage_errors(tmp_path, monkeypatch):
    with pytest.raises(gpu_check.app.UsageError, match="--kernels"):
        _main(tmp_path, monkeypatch, "--kernels=nope", "--skip_conformance", "--time_limit_s=0")
    with pytest.raises(gpu_check.app.UsageError, match="--repeats"):
        _main(tmp_path, monkeypatch, "--repeats=2")
    with pytest.raises(gpu_check.app.UsageError, match="--hidden"):
        _main(tmp_path, monkeypatch, "--head_dims=48", "--hidden=64")


def test_conformance_summary_counts_each_kernel():
    names = ["flash", "pallas_flash", "dot_product"]
    t = "tests/kernels/test_conformance.py::"
    records = [
        {"collected": [f"{t}test_a[pallas_flash-no_mask-float32]", f"{t}test_a[flash-gqa]",
                       f"{t}test_b[dot_product]", f"{t}test_c[dot_product]",
                       f"{t}test_d[dot_product]", "tests/kernels/test_blockwise.py::"
                       "test_pallas_flash_with_several_blocks[8-True]", f"{t}test_e"]},
        {"nodeid": f"{t}test_a[pallas_flash-no_mask-float32]", "when": "call",
         "outcome": "failed", "message": "AssertionError: forward error 1 > 1e-05"},
        {"nodeid": f"{t}test_a[flash-gqa]", "when": "call", "outcome": "passed"},
        {"nodeid": f"{t}test_b[dot_product]", "when": "setup", "outcome": "skipped",
         "message": "hypothesis is not installed"},
        {"nodeid": f"{t}test_c[dot_product]", "when": "setup", "outcome": "failed",
         "message": "fixture error"},
        {"nodeid": f"{t}test_d[dot_product]", "when": "setup", "outcome": "passed"},
        {"nodeid": "tests/kernels/test_blockwise.py::"
         "test_pallas_flash_with_several_blocks[8-True]", "when": "call", "outcome": "passed"},
    ]  # fmt: skip
    summary = gpu_check.summarise_conformance(records, names)
    assert summary["tests"] == 7
    assert summary["totals"] == {"passed": 2, "failed": 2, "skipped": 1, "not_run": 2}
    k = summary["kernels"]
    assert (k["pallas_flash"]["passed"], k["pallas_flash"]["failed"]) == (1, 1)
    assert "forward error" in k["pallas_flash"]["failures"][0]["message"]
    assert k["flash"]["passed"] == 1
    dot = k["dot_product"]
    assert (dot["failed"], dot["skipped"], dot["not_run"]) == (1, 1, 1)  # d: cut off
    assert dot["failures"][0]["message"].startswith("(in setup)")
    assert k["(other)"]["not_run"] == 1


def test_hypothesis_stand_in_skips_property_tests_only():
    modules = gpu_check.hypothesis_stub()
    hypothesis, st = modules["hypothesis"], modules["hypothesis.strategies"]
    hypothesis.settings.register_profile("ci", deadline=None)
    problems = st.composite(lambda draw: draw(st.integers(1, 3)))

    @hypothesis.settings(max_examples=5)
    @hypothesis.seed(3)
    @hypothesis.given(problem=problems())
    def test(name, problem):
        raise AssertionError("never run")

    assert list(inspect.signature(test).parameters) == ["name"]
    with pytest.raises(pytest.skip.Exception, match="hypothesis is not installed"):
        test("flash")


def test_conformance_subprocess_records_outcomes(tmp_path):
    suite = tmp_path / "test_tiny_suite.py"
    suite.write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.parametrize("name", ["flash", "dot_product"])
            def test_passes(name):
                pass

            def test_pallas_flash_fails():
                assert 1 == 2, "planted"

            @pytest.mark.skip(reason="not here")
            def test_dot_product_skips():
                pass
            """
        )
    )
    config = {
        "conformance_tests": [str(suite)],
        "conformance_k": "",
        "conformance_workers": 0,
    }
    result = gpu_check.run_conformance(config, tmp_path, cap_s=120)
    assert result["status"] == "failed" and result["returncode"] == 1
    assert result["totals"] == {"passed": 2, "failed": 1, "skipped": 1, "not_run": 0}
    pallas = result["kernels"]["pallas_flash"]
    assert pallas["failed"] == 1 and "planted" in pallas["failures"][0]["message"]
    assert result["kernels"]["dot_product"]["skips"] == {"not here": 1}
    assert "1 failed" in (tmp_path / "conformance.log").read_text()


# Two benchmark processes (~10 s here): with `pytest -m slow`.
@pytest.mark.slow
def test_a_kernel_that_kills_the_process_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    (tmp_path / "gpu_check_crasher.py").write_text(
        textwrap.dedent(
            """
            import os
            import signal

            from attn_jax import kernels

            @kernels.register("gpu_check_crasher", capabilities={"causal"})
            def crasher(call):
                os.kill(os.getpid(), signal.SIGKILL)  # as a segfaulting compiler would
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("ATTN_JAX_KERNEL_MODULES", "gpu_check_crasher")
    try:
        report = _main(
            tmp_path,
            monkeypatch,
            "--kernels=gpu_check_crasher,dot_product",
            "--seq_lens=32",
            "--head_dims=16",
            "--hidden=16",
            "--causal=true",
            "--modes=forward",
            "--skip_conformance",
            isolate=True,
        )
    finally:
        kernels.unregister("gpu_check_crasher")
    crashed, measured = report["rows"]
    assert crashed["kernel"] == "gpu_check_crasher" and crashed["status"] == "failed"
    assert "died (signal 9)" in crashed["error"]
    assert measured["kernel"] == "dot_product" and measured["status"] == "ok"
    assert "cpu" in report["device"] and report["complete"]
