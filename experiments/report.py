"""One static page of everything the runs and benchmarks wrote.

    python experiments/report.py --out_dir=runs/report            # reads runs/
    python experiments/report.py --runs_dir=/data/runs --out_dir=/tmp/report

Walks ``--runs_dir`` and writes ``--out_dir/index.html``, a single file (plots inlined as
PNG data URIs, the script inline: no server and no network needed) with:

- one section per experiment output: a directory holding ``STEM.md`` next to
  ``STEM.json`` (what every script of ``experiments/`` writes: kernel and model
  benchmarks, the reproduction tables, ...), its Markdown (tables sortable by clicking a
  column header) and the PNG figures beside it;
- one section per training run (a directory with ``metrics.jsonl``, from ``launch.py``
  or an experiment's trials): the last train and eval metrics, ``final_metrics.json``,
  the learning curve and the first ``--max_heatmaps`` attention heatmaps
  (``attention/*.png``).

The page checks itself as it loads (JavaScript errors, images that did not decode) and
writes what it found into ``<pre id="report-check">`` (JSON), which the tests read from
headless Chromium.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import pathlib
import re
from collections.abc import Sequence

from absl import app, flags

__all__ = ["Section", "build_report", "find_sections", "render_html"]

FLAGS = flags.FLAGS


@dataclasses.dataclass
class Section:
    """One block of the page: a title, its HTML body, the directory it came from."""

    title: str
    kind: str  # "experiment" or "run"
    directory: pathlib.Path
    body: str


def _data_uri(path: pathlib.Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: pathlib.Path, root: pathlib.Path) -> str:
    label = html.escape(str(path.relative_to(root)))
    return (
        f'<figure><img src="{_data_uri(path)}" alt="{label}" loading="eager">'
        f"<figcaption>{label}</figcaption></figure>"
    )


def _markdown_html(text: str, directory: pathlib.Path) -> str:
    """Markdown (tables too) as HTML; images it links beside it are inlined, so that the
    page stands alone (a link to a missing file stays, and the page's check reports it)."""
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])

    def inline(match: re.Match) -> str:
        source = html.unescape(match.group(1))
        path = directory / source
        if "://" in source or source.startswith("data:") or not path.is_file():
            return match.group(0)
        return f'src="{_data_uri(path)}"'

    return re.sub(r'src="([^"]+)"', inline, body)


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _experiment(md_path: pathlib.Path, root: pathlib.Path) -> Section:
    directory = md_path.parent
    body = _markdown_html(md_path.read_text(), directory)
    figures = sorted(directory.glob("*.png"))
    body += "".join(_figure(p, root) for p in figures)
    title = f"{md_path.stem} ({directory.relative_to(root)})"
    return Section(title, "experiment", directory, body)


def _last(records: list[dict], split: str) -> dict:
    rows = [r for r in records if r.get("split") == split]
    return rows[-1] if rows else {}


def _run(directory: pathlib.Path, root: pathlib.Path, max_heatmaps: int) -> Section:
    records = []
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    metrics = {}
    for split in ("train", "eval"):
        for name, value in _last(records, split).items():
            if name != "split":
                metrics[f"{split} {name}"] = value
    final_path = directory / "final_metrics.json"
    if final_path.is_file():
        final = json.loads(final_path.read_text())
        metrics.update({f"final {k}": v for k, v in final.items()})
    body = _table(sorted(metrics.items()), ["metric", "value"]) if metrics else ""
    config_path = directory / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        model = config.get("model", {})
        summary = {
            "task": config.get("data", {}).get("name"),
            "attention": model.get("attention"),
            "steps": config.get("train", {}).get("steps"),
        }
        body = (
            "<p class=meta>"
            + html.escape(", ".join(f"{k} {v}" for k, v in summary.items() if v is not None))
            + "</p>"
            + body
        )
    images = (
        [directory / "learning_curve.png"] if (directory / "learning_curve.png").is_file() else []
    )
    images += sorted((directory / "attention").glob("*.png"))[:max_heatmaps]
    body += "".join(_figure(p, root) for p in images)
    return Section(str(directory.relative_to(root)), "run", directory, body)


def find_sections(runs_dir: pathlib.Path, *, skip: pathlib.Path | None = None,
                  max_heatmaps: int = 4) -> list[Section]:  # fmt: skip
    """The experiment outputs and training runs under ``runs_dir`` (``skip``: a
    directory to leave out, the report's own), experiments first, each group by path."""
    runs_dir = pathlib.Path(runs_dir)
    skip = skip.resolve() if skip is not None else None

    def kept(path: pathlib.Path) -> bool:
        return skip is None or skip not in (path.resolve(), *path.resolve().parents)

    experiments = [
        _experiment(md, runs_dir)
        for md in sorted(runs_dir.rglob("*.md"))
        if md.with_suffix(".json").is_file() and kept(md)
    ]
    runs = [
        _run(m.parent, runs_dir, max_heatmaps)
        for m in sorted(runs_dir.rglob("metrics.jsonl"))
        if kept(m)
    ]
    return experiments + runs


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
nav{padding:8px 24px;background:#e8ecf1;font-size:13px}nav a{margin-right:14px}
main{padding:8px 24px}section{background:#fff;border:1px solid #dde2e8;border-radius:6px;
margin:14px 0;padding:6px 16px 14px}h2{font-size:16px;margin:10px 0}
.kind{font-size:11px;text-transform:uppercase;color:#fff;background:#457b9d;border-radius:3px;
padding:1px 6px;margin-right:8px;vertical-align:middle}.kind.run{background:#2a9d8f}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th{background:#eef2f6;cursor:pointer;user-select:none;white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
figure img{max-width:520px;max-height:420px;border:1px solid #e1e4e8}
figcaption{font-size:12px;color:#57606a}.meta{color:#57606a}
pre#report-check{display:none}
"""

# Runs first: records errors from the start, sorts tables, checks every image on load.
_SCRIPT = """
window.__reportErrors = [];
window.addEventListener("error", function (e) {
  window.__reportErrors.push(e.message || ("failed to load " + (e.target && e.target.src)));
}, true);
function reportValue(text) {
  var t = text.replace(/[,%x\\s]/g, "");
  return t !== "" && !isNaN(Number(t)) ? Number(t) : null;
}
function sortTable(table, column, descending) {
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[column] ? a.cells[column].textContent : "";
    var y = b.cells[column] ? b.cells[column].textContent : "";
    var nx = reportValue(x), ny = reportValue(y), order;
    if (nx !== null && ny !== null) order = nx - ny;
    else order = x.localeCompare(y);
    return descending ? -order : order;
  });
  rows.forEach(function (row) { body.appendChild(row); });
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    th.className = i === column ? (descending ? "desc" : "asc") : "";
  });
}
document.addEventListener("DOMContentLoaded", function () {
  Array.prototype.forEach.call(document.querySelectorAll("table"), function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.addEventListener("click", function () {
        sortTable(table, i, th.className === "asc");
      });
    });
  });
});
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) {
    return !img.complete || img.naturalWidth === 0;
  }).map(function (img) { return img.alt || img.src.slice(0, 60); });
  var tables = document.querySelectorAll("table");
  try {  // sorting works on every table, both ways; then the written order is restored
    Array.prototype.forEach.call(tables, function (table) {
      if (!table.tHead || !table.tBodies.length) return;
      var written = Array.prototype.slice.call(table.tBodies[0].rows);
      sortTable(table, 0, true);
      sortTable(table, 0, false);
      written.forEach(function (row) { table.tBodies[0].appendChild(row); });
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
        th.className = "";
      });
    });
  } catch (e) { window.__reportErrors.push("sorting: " + e.message); }
  document.getElementById("report-check").textContent = JSON.stringify({
    errors: window.__reportErrors, broken: broken, images: images.length,
    tables: tables.length, sections: document.querySelectorAll("section").length
  });
});
"""


def render_html(sections: Sequence[Section], *, title: str = "attn_jax report") -> str:
    """The page: a table of contents, then every section; one self-contained string."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#s{i}">{html.escape(s.title)}</a>' for i, s in enumerate(sections))
    blocks = "".join(
        f'<section id="s{i}"><h2><span class="kind {s.kind}">{s.kind}</span>'
        f"{html.escape(s.title)}</h2>{s.body}</section>"
        for i, s in enumerate(sections)
    )
    if not sections:
        blocks = "<p>Nothing found: run launch.py or an experiment first.</p>"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{_SCRIPT}</script></head><body>"
        f"<header><h1>{html.escape(title)}</h1>{len(sections)} sections, written {stamp}"
        f"</header><nav>{nav}</nav><main>{blocks}</main>"
        '<pre id="report-check"></pre></body></html>'
    )


def build_report(runs_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
                 *, max_heatmaps: int = 4) -> pathlib.Path:  # fmt: skip
    """Writes ``out_dir/index.html`` from what ``runs_dir`` holds and returns its path."""
    runs_dir, out_dir = pathlib.Path(runs_dir), pathlib.Path(out_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"--runs_dir: {runs_dir} is not a directory")
    if max_heatmaps < 0:
        raise ValueError(f"--max_heatmaps: expected a non-negative integer, got {max_heatmaps}")
    sections = find_sections(runs_dir, skip=out_dir, max_heatmaps=max_heatmaps)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / "index.html"
    partial = out_dir / "index.html.tmp"  # never a half-written index.html
    partial.write_text(render_html(sections), encoding="utf-8")
    partial.replace(index)
    return index


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    try:
        index = build_report(FLAGS.runs_dir, FLAGS.out_dir, max_heatmaps=FLAGS.max_heatmaps)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    print(f"report: {index} (open it in a browser; it needs no server)")


if __name__ == "__main__":
    flags.DEFINE_string("runs_dir", "runs", "Directory the runs and experiments wrote into.")
    flags.DEFINE_string("out_dir", "runs/report", "Where index.html is written.")
    flags.DEFINE_integer("max_heatmaps", 4, "Attention heatmaps shown per training run.")
    app.run(main)
