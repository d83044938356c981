"""attn_jax entry point: ``python launch.py --config=configs/NAME.py[:ARG] [--workdir=DIR]``.

Configs are Python files with ``get_config(arg)``; any field can be overridden with
``--config.FIELD=VALUE``. Training configs (``config.task = "train"``, e.g. the default,
``configs/mqar.py``) train and evaluate in ``--workdir`` (default ``runs/NAME[_ARG]``);
rerunning the same command resumes from the newest checkpoint there. ``--sweep`` runs the
config's trials (grid or optuna), optionally side by side on device groups;
``--distributed`` joins a multi-host job. The kernel demo (``configs/kernel_demo.py``)
runs every registered kernel on a small problem::

    python launch.py --config=configs/mqar.py --config.model.attention=dot_product
    python launch.py --config=configs/mqar.py --sweep --sweep_parallel=2
    python launch.py --config=configs/scan_rnn.py:quick --config.data.split=length
    python launch.py --config=configs/mqar.py --config.train.sequence_parallel=4
                                              # each sequence split over 4 devices (ring)
    python launch.py --config=configs/kernel_demo.py --config.kernels=dot_product,additive

Training configs write ``final_metrics.json`` (the task's full evaluation) and
``attention/*.png`` (attention heatmaps) once training is complete.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import NoReturn

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from attn_jax import demo, kernels
from attn_jax.train.loop import TrainingDivergedError, train_and_evaluate
from attn_jax.train.optuna_search import run_study
from attn_jax.train.sweep import SweepInterruptedError, apply_overrides, device_groups, run_sweep
from attn_jax.train.validate import ConfigError, validate_train_config

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = str(ROOT / "configs" / "mqar.py")
# No default here: ml_collections would parse --config.* overrides at import time. The
# default is inserted by parse_flags instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config file, optionally with :ARG (default {DEFAULT_CONFIG})."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory for training configs (default: runs/NAME[_ARG])."
)
_SWEEP = flags.DEFINE_bool(
    "sweep",
    False,
    "Sweep: run the trials of the config file's get_sweep(arg) (grid backend) or an optuna "
    "study over its get_search_space(arg), each trial in WORKDIR/trial_NNN.",
)
_SWEEP_BACKEND = flags.DEFINE_enum(
    "sweep_backend", "grid", ["grid", "optuna"], "How --sweep picks trials."
)
_SWEEP_PARALLEL = flags.DEFINE_integer(
    "sweep_parallel",
    1,
    "Trials run side by side, each on its own group of local devices (the device count "
    "divided by this).",
)
_OPTUNA_TRIALS = flags.DEFINE_integer(
    "optuna_trials", 20, "Finished trials the optuna study should hold (all processes)."
)
_OPTUNA_STORAGE = flags.DEFINE_string(
    "optuna_storage",
    None,
    "Optuna storage URL shared by every process of the study (default "
    "sqlite:///WORKDIR/optuna.db).",
)
_OPTUNA_STUDY = flags.DEFINE_string(
    "optuna_study", None, "Optuna study name (default: the workdir's name)."
)
_OPTUNA_SEED = flags.DEFINE_integer(
    "optuna_seed", None, "Sampler seed (default random; give processes different seeds)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: call jax.distributed.initialize() before training (arguments from the "
    "flags below, or auto-detected on TPU pods and SLURM).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (jax.distributed)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Devices this process uses, e.g. 0,1 (jax.distributed)."
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


def _fail(message: str) -> NoReturn:
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


def resolve_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config`` defaulted and its file found: a path that does not exist
    from the working directory but does among the installed configs (``configs/mqar.py``
    run from anywhere by ``attn-jax-launch``) is made absolute."""
    argv = list(argv)
    for index, argument in enumerate(argv[1:], 1):
        if argument == "--config" and index + 1 < len(argv):  # --config FILE
            argv[index : index + 2] = [argument := f"--config={argv[index + 1]}"]
        if argument.startswith("--config="):
            path, colon, arg = argument.removeprefix("--config=").partition(":")
            if not pathlib.Path(path).exists() and (ROOT / path).is_file():
                argv[index] = f"--config={ROOT / path}{colon}{arg}"
            return argv
    return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns bad flags and config errors into one line, exit code 2."""
    argv = resolve_config(argv)
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
    """``runs/NAME[_ARG]`` from the ``--config`` file name and its arguments."""
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    name = pathlib.Path(spec.split(":")[0]).stem
    arg = spec.split(":", 1)[1] if ":" in spec else ""
    arg = arg.replace(",", "_").replace("=", "-")  # quick,seq_len=128 -> quick_seq_len-128
    return pathlib.Path("runs") / (f"{name}_{arg}" if arg else name)


def _config_function(name: str):
    """``name(arg)`` from the ``--config`` file, bound to its ``:ARG``."""
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        _fail(f"--sweep: {path} defines no {name}(arg)")
    return lambda: getattr(module, name)(arg or None)


def _validate_trial(config: ConfigDict, group_size: int) -> None:
    """Raises ``ConfigError`` for a trial config that cannot run on ``group_size`` devices."""
    validate_train_config(config, group_size, jax.process_count())


def load_sweep(config: ConfigDict, group_size: int) -> list[dict]:
    """Trials from the config file's ``get_sweep(arg)``, each validated before any runs."""
    trials = _config_function("get_sweep")()
    for index, trial in enumerate(trials):
        try:
            trial_config = apply_overrides(config, trial)
            if _SWEEP_PARALLEL.value > 1:
                trial_config.train.num_devices = group_size
            _validate_trial(trial_config, group_size)
        except (ConfigError, ValueError) as error:
            _fail(f"sweep trial {index} {trial}: {error}")
    return trials


def run_sweep_flags(config: ConfigDict, workdir: pathlib.Path) -> None:
    """``--sweep``: the grid trials or an optuna study, on ``--sweep_parallel`` groups."""
    parallel = _SWEEP_PARALLEL.value
    if parallel < 1:
        _fail(f"--sweep_parallel: expected a positive integer, got {parallel}")
    if parallel > 1 and jax.process_count() > 1:
        _fail("--sweep_parallel: side-by-side trials need a single process (no --distributed)")
    try:
        groups = device_groups(parallel) if parallel > 1 else None
    except ValueError as error:
        _fail(f"--sweep_parallel: {error}")
    group_size = len(groups[0]) if groups else jax.local_device_count()
    if _SWEEP_BACKEND.value == "grid":
        trials = load_sweep(config, group_size)
        print(f"workdir: {workdir}", flush=True)
        rows = run_sweep(config, trials, workdir, train_and_evaluate, groups=groups)
    else:
        if jax.process_count() > 1:
            _fail(
                "--sweep_backend=optuna: run one single-host process per trial stream, all "
                "with the same --optuna_storage, instead of --distributed"
            )
        try:
            space = _config_function("get_search_space")()
            _validate_trial(config, group_size)
        except (ConfigError, ValueError) as error:
            _fail(f"--sweep_backend=optuna: {error}")
        print(f"workdir: {workdir}", flush=True)
        rows = run_study(
            config,
            space,
            workdir,
            train_and_evaluate,
            num_trials=_OPTUNA_TRIALS.value,
            storage=_OPTUNA_STORAGE.value,
            study_name=_OPTUNA_STUDY.value,
            seed=_OPTUNA_SEED.value,
            groups=groups,
            validate=lambda c: _validate_trial(c, group_size),
        )
    scored = [r for r in rows if r.get("accuracy") == r.get("accuracy")]  # drop NaN
    best = max(scored, key=lambda r: r["accuracy"]) if scored else None
    summary = f"best {best['trial']} accuracy {best['accuracy']:.4f}" if best else "none finished"
    print(f"sweep done: {len(rows)} trials; {summary}; see {workdir}/leaderboard.md")


def _from_environment(name: str) -> int | None:
    """An integer from the environment variable ``name`` (unset: ``None``)."""
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        _fail(f"environment variable {name}: expected an integer, got {value!r}")


def init_distributed() -> None:
    """``--distributed``: ``jax.distributed.initialize`` (before any jax use) from the flags,
    else from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and
    ``JAX_LOCAL_DEVICE_IDS``), else from the cluster (SLURM, TPU pods, ...)."""
    if not _DISTRIBUTED.value:
        if _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
            _fail("--coordinator_address/--num_processes/--process_id need --distributed")
        return
    ids = _LOCAL_DEVICE_IDS.value
    num_processes = _NUM_PROCESSES.value
    process_id = _PROCESS_ID.value
    if num_processes is None:
        num_processes = _from_environment("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _from_environment("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,  # None: jax reads JAX_COORDINATOR_ADDRESS
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=[int(i) for i in ids] if ids else None,
        )
    except (ValueError, RuntimeError) as error:
        _fail(f"--distributed: jax.distributed.initialize failed: {error}")


def run_train(config: ConfigDict) -> None:
    init_distributed()
    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else default_workdir()
    sweep_flags = [f for f in ("sweep_backend", "sweep_parallel") if flags.FLAGS[f].present]
    sweep_flags += [f for f in flags.FLAGS if f.startswith("optuna_") and flags.FLAGS[f].present]
    if sweep_flags and not _SWEEP.value:
        _fail(f"--{sweep_flags[0]}: only applies with --sweep")
    if _SWEEP.value:
        try:
            run_sweep_flags(config, workdir)
        except SweepInterruptedError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(143)
        return
    try:
        validate_train_config(config, jax.local_device_count(), jax.process_count())
    except ConfigError as error:
        _fail(str(error))
    print(f"workdir: {workdir}", flush=True)
    try:
        result = train_and_evaluate(config, workdir)
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if result["interrupted"]:
        sys.exit(143)
    summary = " | ".join(f"{k} {v:.4f}" for k, v in result["eval"].items())
    final = " | ".join(f"{k} {v:.4f}" for k, v in result["final"].items() if isinstance(v, float))
    final = f" | final {final}" if final else ""
    print(f"done: step {result['step']} | eval {summary}{final} | outputs in {workdir}", flush=True)


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


def run() -> None:
    """The ``attn-jax-launch`` console script: ``python launch.py`` from any directory."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
