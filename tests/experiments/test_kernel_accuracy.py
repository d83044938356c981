"""experiments/kernel_accuracy.py writes a truthful accuracy table."""

from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "kernel_accuracy", ROOT / "experiments" / "kernel_accuracy.py"
)
kernel_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_accuracy)


def test_accuracy_table(tmp_path):
    rows = kernel_accuracy.run(["dot_product"], ["float32", "bfloat16"], [16], str(tmp_path))
    assert len(rows) == 2 * len(kernel_accuracy.MASKS)
    assert all(r["within_tolerance"] for r in rows)
    f32 = [r for r in rows if r["dtype"] == "float32"]
    bf16 = [r for r in rows if r["dtype"] == "bfloat16"]
    # bfloat16 inputs round to 8 bits: clearly larger errors than float32, and non-zero.
    assert max(r["forward_error"] for r in f32) < 1e-5 < min(r["forward_error"] for r in bf16)
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert saved == rows
    table = (tmp_path / "accuracy.md").read_text()
    assert table.count("| dot_product |") == len(rows)


def test_masks_outside_capabilities_are_skipped():
    from attn_jax import kernels

    @kernels.register("accuracy_plain", capabilities=kernels.Capabilities())
    def plain(query, key, value):
        return kernels.dot_product_attention(query, key, value)

    try:
        assert kernel_accuracy.supported_masks("accuracy_plain") == ["none"]
        assert kernel_accuracy.supported_masks("dot_product") == list(kernel_accuracy.MASKS)
    finally:
        kernels.unregister("accuracy_plain")
