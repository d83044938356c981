"""attn_jax entry point: ``python launch.py --config=configs/NAME.py[:ARG] [--workdir=DIR]``.

Configs are Python files with ``get_config(arg)``; any field can be overridden with
``--config.FIELD=VALUE``. Training configs (``config.task = "train"``, e.g.
``configs/mqar.py``) train and evaluate in ``--workdir`` (default ``runs/NAME[_ARG]``);
rerunning the same command resumes from the newest checkpoint there. The kernel demo
(``configs/kernel_demo.py``) runs every registered kernel on a small problem::

    python launch.py --config=configs/mqar.py --config.model.attention=dot_product
    python launch.py --config=configs/kernel_demo.py --config.kernels=dot_product,additive
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from attn_jax import demo, kernels
from attn_jax.train.loop import TrainingDivergedError, train_and_evaluate
from attn_jax.train.sweep import apply_overrides, run_sweep
from attn_jax.train.validate import ConfigError, validate_train_config

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = str(ROOT / "configs" / "kernel_demo.py")
# No default here: ml_collections would parse --config.* overrides at import time. The
# default is inserted by parse_flags instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config file, optionally with :ARG (default {DEFAULT_CONFIG})."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory for training configs (default: runs/NAME[_ARG])."
)
_SWEEP = flags.DEFINE_bool(
    "sweep", False, "Run every trial of the config's get_sweep(arg), each in WORKDIR/trial_NNN."
)

DTYPES = ("float32", "bfloat16", "float16")


def validate_kernel_demo(config: ConfigDict) -> list[str]:
    """Checks a kernel-demo config and returns the kernel names to run."""
    names = [n.strip() for n in str(config.kernels).split(",") if n.strip()]
    unknown = sorted(set(names) - set(kernels.available()))
    if unknown:
        raise ConfigError(
            f"config.kernels: unknown kernel(s) {', '.join(unknown)}; "
            f"available: {', '.join(kernels.available())}"
        )
    for key in ("batch", "seq_len"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"config.{key}: expected a positive integer, got {config[key]!r}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype: expected one of {DTYPES}, got {config.dtype!r}")
    return names or kernels.available()


def _fail(message: str) -> None:
    """One clear line on stderr and exit code 2 (bad usage), before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(error: Exception) -> str:
    """A flag-parsing error as one line (an exception inside get_config() keeps its last line)."""
    text = str(error).strip()
    if "Traceback" in text:
        lines = text.splitlines()
        return f"{lines[0].split(': Error whilst')[0]}: {lines[-1].strip()}"
    message = " ".join(text.split())
    cause = error.__cause__ or error.__context__
    if cause is not None and " ".join(str(cause).split()) not in message:
        message += f": {' '.join(str(cause).split())}"
    return message


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns bad flags and config errors into one line, exit code 2."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.keys()  # loads the config file now, so a missing file fails here
        return remaining
    except (AttributeError, KeyError) as error:  # --config.<unknown key>=...
        key = str(error).strip("\"'")
        culprit = next((a.split("=")[0] for a in argv if f".{key}" in a), key)
        _fail(f"{culprit}: no such key in the config")
    except OSError as error:  # missing or unreadable config file
        _fail(f"--config: {str(error).strip().splitlines()[-1].strip()}")
    except (flags.Error, ValueError, TypeError) as error:
        _fail(_one_line(error))
    raise AssertionError("unreachable")


def default_workdir() -> pathlib.Path:
    """``runs/NAME[_ARG]`` from the ``--config`` file name and variant."""
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    name = pathlib.Path(spec.split(":")[0]).stem
    arg = spec.split(":", 1)[1] if ":" in spec else ""
    return pathlib.Path("runs") / (f"{name}_{arg}" if arg else name)


def load_sweep(config: ConfigDict) -> list[dict]:
    """Trials from the config file's ``get_sweep(arg)``, each validated before any runs."""
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        _fail(f"--sweep: {path} defines no get_sweep(arg)")
    trials = module.get_sweep(arg or None)
    for index, trial in enumerate(trials):
        try:
            validate_train_config(apply_overrides(config, trial), jax.local_device_count())
        except (ConfigError, ValueError) as error:
            _fail(f"sweep trial {index} {trial}: {error}")
    return trials


def run_train(config: ConfigDict) -> None:
    try:
        validate_train_config(config, jax.local_device_count())
    except ConfigError as error:
        _fail(str(error))
    trials = load_sweep(config) if _SWEEP.value else None
    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else default_workdir()
    print(f"workdir: {workdir}", flush=True)
    if trials is not None:
        rows = run_sweep(config, trials, workdir, train_and_evaluate)
        best = max(rows, key=lambda r: r.get("accuracy", -1.0))
        print(
            f"sweep done: {len(rows)} trials; best {best['trial']} accuracy "
            f"{best.get('accuracy', float('nan')):.4f}; see {workdir}/leaderboard.md"
        )
        return
    try:
        result = train_and_evaluate(config, workdir)
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if result["interrupted"]:
        sys.exit(143)
    summary = " | ".join(f"{k} {v:.4f}" for k, v in result["eval"].items())
    print(f"done: step {result['step']} | eval {summary} | outputs in {workdir}", flush=True)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # jax's backend-probing INFO lines are noise here
    config = _CONFIG.value
    task = config.get("task")
    if task == "train":
        run_train(config)
        return
    if task != "kernel_demo":
        _fail(f"config.task: unknown task {task!r}; expected 'train' or 'kernel_demo'")
    try:
        names = validate_kernel_demo(config)
    except ConfigError as error:
        _fail(str(error))
    rows = demo.run_demo(names, batch=config.batch, seq_len=config.seq_len, dtype=config.dtype)
    print(demo.format_table(rows))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
