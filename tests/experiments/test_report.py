"""experiments/report.py: one self-contained index.html, rendered in headless Chromium."""

import json
import pathlib
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from attn_jax import viz
from attn_jax.train.metrics import MetricsWriter, plot_learning_curve
from experiments import report, reporting

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = (
    "headless Chromium not found: install Debian's chromium package (apt-get install "
    "chromium; .ci/run does) to render the report"
)


def _runs(root: pathlib.Path) -> pathlib.Path:
    """What a benchmark and a training run write, by the writers they use."""
    bench = root / "bench_kernels"
    rows = [["flash", 1024, "12.5", "2.10x"], ["dot_product", 1024, "26.3", "1.00x"],
            ["chunked", 256, "3.1", "0.95x"]]  # fmt: skip
    table = reporting.markdown_table(["kernel", "N", "ms", "speed-up"], rows)
    reporting.write_outputs(bench, "bench_kernels", {"rows": rows}, "Measured here.\n\n" + table)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2])
    reporting.save_figure(fig, bench / "bench_kernels.png")
    plt.close(fig)
    run = root / "mqar"
    run.mkdir()
    writer = MetricsWriter(run, total_steps=4)
    for step in (2, 4):
        writer.write(step, "train", {"loss": 3.0 / step, "accuracy": 0.2 * step})
    writer.write(4, "eval", {"loss": 1.1, "accuracy": 0.75})
    writer.jsonl.close()
    plot_learning_curve(run / "metrics.jsonl", run / "learning_curve.png")
    (run / "final_metrics.json").write_text(json.dumps({"accuracy": 0.8125}))
    (run / "config.json").write_text(json.dumps({"data": {"name": "mqar"},
                                                 "model": {"attention": "flash"}}))  # fmt: skip
    weights = np.random.RandomState(0).dirichlet(np.ones(6), size=(2, 6))
    for layer in range(3):
        viz.save_attention(run / "attention" / f"layer{layer}.png", weights)
    return root


def _render(index: pathlib.Path, tmp_path: pathlib.Path) -> tuple[dict, pathlib.Path]:
    """The page's own check (JSON) read from Chromium's DOM, and a screenshot."""
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--virtual-time-budget=10000"]  # fmt: skip
    url = index.resolve().as_uri()
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    found = re.search(r'<pre id="report-check">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the page's check did not run"
    shot = tmp_path / "screenshot.png"
    subprocess.run([*common, "--window-size=1280,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    return json.loads(found.group(1).replace("&quot;", '"')), shot


def test_report_gathers_benchmarks_and_runs_into_one_self_contained_page(tmp_path):
    runs = _runs(tmp_path / "runs")
    index = report.build_report(runs, runs / "report", max_heatmaps=2)
    page = index.read_text()
    assert index == runs / "report" / "index.html"
    # Nothing is fetched: every image is inline, no address outside the page.
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', page)
    assert page.count('src="data:image/png;base64,') == 1 + 1 + 2  # bench, curve, 2 heatmaps
    assert "<th>kernel</th>" in page and "<td>flash</td>" in page  # the Markdown table
    assert "final accuracy" in page and "0.8125" in page and "eval accuracy" in page
    assert "attention flash" in page  # the run's config summary
    # The report's own directory is not reported on a second build.
    assert (
        report.build_report(runs, runs / "report", max_heatmaps=2).read_text().count("<section")
        == page.count("<section")
        == 2
    )
    with pytest.raises(ValueError, match="--runs_dir"):
        report.build_report(tmp_path / "missing", tmp_path / "out")


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_renders_in_headless_chromium_without_errors(tmp_path):
    runs = _runs(tmp_path / "runs")
    check, shot = _render(report.build_report(runs, runs / "report", max_heatmaps=2), tmp_path)
    assert check == {"errors": [], "broken": [], "images": 4, "tables": 2, "sections": 2}
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 0.05  # not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_chromium_check_catches_a_missing_image_and_a_script_error(tmp_path):
    broken = report.Section(
        "broken", "run", tmp_path,
        '<img src="missing.png" alt="missing.png"><script>notDefined();</script>',
    )  # fmt: skip
    index = tmp_path / "index.html"
    index.write_text(report.render_html([broken]))
    check, _ = _render(index, tmp_path)
    assert check["broken"] == ["missing.png"]
    assert any("notDefined" in e for e in check["errors"]), check["errors"]
