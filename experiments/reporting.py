"""Shared by the reproduction scripts: configs by name, resumable trials, tables, figures.

``configs`` and ``experiments`` are packages installed with attn_jax (``pip install -e .``),
so the scripts import them from any directory.

Every script trains its trials through the launcher's own loop (so each trial directory is
an ordinary run directory: checkpoints, metrics, ``final_metrics.json``, attention plots),
skips trials that finished in an earlier invocation and resumes interrupted ones.

Only jax is imported up front (the training stack, and with it ml_collections, where a trial
runs), so the benchmark scripts use the table and output helpers on bare GPU machines.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:
    import ml_collections

__all__ = [
    "load_config",
    "markdown_table",
    "percent",
    "positive_ints",
    "run_trials",
    "save_figure",
    "start",
    "steps_override",
    "true_false",
    "write_outputs",
]


def start(argv: Sequence[str], **choices: tuple[Sequence[str], Iterable[str]]) -> None:
    """The common start of a script's ``main``: no positional arguments, every
    ``--NAME`` flag's values among the known ones (``NAME=(chosen, known)``), and only
    warnings from absl logging (orbax logs every checkpoint at INFO)."""
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    for name, (chosen, known) in choices.items():
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise app.UsageError(f"--{name}: unknown {unknown}; expected some of {list(known)}")
    logging.set_verbosity(logging.WARNING)


def steps_override(steps: int) -> dict[str, int] | None:
    """``--steps``: every trial's ``config.train.steps`` (0 keeps the configs')."""
    return {"train.steps": steps} if steps else None


def load_config(name: str, variant: str | None) -> ml_collections.ConfigDict:
    """``configs/NAME.py``'s ``get_config(variant)``."""
    return importlib.import_module(f"configs.{name}").get_config(variant)


def run_trials(
    base: ml_collections.ConfigDict,
    trials: Mapping[str, Mapping[str, Any]],
    out_dir: str | pathlib.Path,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Trains every named trial (dotted-key overrides of ``base``, then ``overrides`` for
    all of them) in ``out_dir/NAME``; every config is validated before the first trial.

    Returns:
      ``{name: {"status", "eval", "final", "overrides"}}`` (each trial's ``result.json``).
    """
    from attn_jax.train.loop import train_and_evaluate
    from attn_jax.train.sweep import apply_overrides, run_sweep
    from attn_jax.train.validate import validate_train_config

    names = list(trials)
    overrides = dict(overrides or {})
    settings = [{**trials[name], **overrides} for name in names]
    for name, setting in zip(names, settings, strict=True):
        try:
            validate_train_config(apply_overrides(base, setting), jax.local_device_count())
        except ValueError as error:
            raise ValueError(f"trial {name}: {error}") from None
    out_dir = pathlib.Path(out_dir)
    run_sweep(base, settings, out_dir, train_and_evaluate, names=names)
    return {name: json.loads((out_dir / name / "result.json").read_text()) for name in names}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: str | pathlib.Path) -> pathlib.Path:
    """Saves a matplotlib ``Figure`` as PNG (parents created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_outputs(
    out_dir: str | pathlib.Path, stem: str, data: Any, markdown: str
) -> tuple[pathlib.Path, pathlib.Path]:
    """``STEM.json`` (machines) and ``STEM.md`` (people) in ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=1))
    md_path.write_text(markdown)
    return json_path, md_path


def percent(value: float | None) -> str:
    """``0.1234 -> "12.3"``; a missing value (diverged trial) prints as ``-``."""
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def positive_ints(values: Sequence[str], flag: str, *, allow_empty: bool = True) -> list[int]:
    """A list flag's values as positive integers; ``app.UsageError`` naming ``--flag``."""
    from absl import app

    try:
        out = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{flag}: expected integers, got {values}") from None
    if (not out and not allow_empty) or any(v < 1 for v in out):
        raise app.UsageError(f"--{flag}: expected positive integers, got {values}")
    return out


def true_false(values: Sequence[str], flag: str) -> list[bool]:
    """A list flag's ``true`` / ``false`` values; ``app.UsageError`` naming ``--flag``."""
    from absl import app

    out = []
    for value in values:
        if value.lower() not in ("true", "false"):
            raise app.UsageError(f"--{flag}: expected true/false values, got {value!r}")
        out.append(value.lower() == "true")
    return out
