"""The reproduction scripts run end to end at smoke sizes and write truthful tables."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from experiments import listops, mqar_table, scan_table, seq2seq_attention
from tests.train.test_tasks import SMALL, SMOKE


def _png_ok(path):
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.02


def test_scan_table_writes_the_table_next_to_the_published_figures(tmp_path):
    overrides = {**SMOKE, **SMALL["scan_rnn"]}
    report = scan_table.run(
        tmp_path, models=["lstm_additive"], splits=["simple"], overrides=overrides
    )
    final = report["exact_match"]["lstm_additive"]["simple"]
    assert final["count"] == 24 and 0.0 <= final["exact_match"] <= 1.0
    table = (tmp_path / "scan.md").read_text()
    assert f"| lstm_additive | {100 * final['exact_match']:.1f} |" in table
    assert "| best of Lake & Baroni (2018) | 99.8 |" in table
    assert json.loads((tmp_path / "scan.json").read_text())["published_best"]["length"] == 20.8
    _png_ok(tmp_path / "scan.png")
    trial = tmp_path / "lstm_additive" / "simple" / "result.json"
    stamp = trial.stat().st_mtime_ns
    scan_table.run(tmp_path, models=["lstm_additive"], splits=["simple"], overrides=overrides)
    assert trial.stat().st_mtime_ns == stamp  # finished trials are skipped on rerun


def test_seq2seq_attention_reports_bleu_by_length_and_copies_alignments(tmp_path):
    overrides = {**SMOKE, **SMALL["numbers_rnn"]}
    report = seq2seq_attention.run(tmp_path, models=["lstm_additive"], overrides=overrides)
    final = report["final"]["lstm_additive"]
    assert final["count"] == 24 and 0.0 <= final["bleu"] <= 100.0
    table = (tmp_path / "seq2seq.md").read_text()
    assert "BLEU by number of English input tokens" in table and "| examples |" in table
    assert f"| lstm_additive | {final['bleu']:.1f} |" in table
    alignments = sorted(p.name for p in (tmp_path / "alignments").glob("*.png"))
    assert alignments == [
        "lstm_additive_example_0_alignment.png",
        "lstm_additive_example_1_alignment.png",
    ]
    _png_ok(tmp_path / "seq2seq.png")


def test_listops_table_quotes_lra_and_the_majority_class(tmp_path):
    overrides = {**SMOKE, **SMALL["listops"]}
    report = listops.run(tmp_path, kernels=["linear"], overrides=overrides)
    table = (tmp_path / "listops.md").read_text()
    assert "| linear |" in table and "| Linear Transformer | 16.13 |" in table
    assert 0.0 < report["majority_class"] <= 1.0 and "| majority class |" in table
    _png_ok(tmp_path / "listops.png")


def test_mqar_table_covers_each_kernel_and_width(tmp_path):
    overrides = {**SMOKE, "data.vocab_size": 256, "data.num_train": 64, "data.num_eval": 16}
    report = mqar_table.run(
        tmp_path,
        kernels=["dot_product", "sliding_window"],
        lengths=[64],
        widths=[16],
        learning_rates=[3e-3],
        overrides=overrides,
    )
    accuracy = report["accuracy"][64]
    assert set(accuracy) == {"dot_product", "sliding_window"}
    assert all(0.0 <= by_width[16] <= 1.0 for by_width in accuracy.values())
    config = json.loads(
        (tmp_path / "L64" / "sliding_window_w16_lr0.003" / "config.json").read_text()
    )
    assert config["model"]["attention_kwargs"]["local_window_size"] == [16, 0]
    assert "| kernel | width 16 |" in (tmp_path / "mqar.md").read_text()
    _png_ok(tmp_path / "mqar.png")


def test_unknown_kernel_in_a_grid_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"trial bogus_w16_lr0\.003: config\.model\.attention"):
        mqar_table.run(
            tmp_path, kernels=["bogus"], lengths=[64], widths=[16], learning_rates=[3e-3]
        )
    assert not list(tmp_path.iterdir())
