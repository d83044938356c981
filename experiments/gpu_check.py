"""The GPU check: every kernel's conformance natively on the GPU, then the speed table.

On a machine with an NVIDIA GPU (H100 / H200), one short run (under 8 minutes on an H200,
compilation included) does two things, in this order:

1. **Conformance.** The kernel conformance suite (``tests/kernels/test_conformance.py``:
   every registered ``dot_product`` kernel against the float64 reference, and the
   multi-block Pallas test of ``test_blockwise.py``) runs in a pytest subprocess with its
   own time cap, on the GPU as the default backend. Pallas kernels use their interpreter
   only when the backend is not a GPU, so there they compile natively (Triton); their tests
   run first. Result: passed / failed / skipped / not run per kernel, and the failures.
2. **Benchmark.** Forward and forward + backward, bfloat16, head dims 64 and 128, N from
   1,024 to 16,384, causal and not, for ``pallas_flash``, ``flash``, ``dot_product`` and
   ``auto`` (the front end with ``implementation=None``) against
   ``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` and ``"xla"``. The
   timing, FLOP count and memory check are ``bench_kernels``'s: the median of ``--repeats``
   (>= 5) runs after a warm-up, TFLOP/s by the FlashAttention convention (forward
   ``4 * batch * heads * N^2 * head_dim``, halved when causal, forward + backward 3.5x).
   As in the FlashAttention papers, the tokens per call are constant (``batch = max(1,
   tokens // N)``) and ``heads = hidden // head_dim`` (hidden 2,048).

Nothing stops the run: a kernel that fails is recorded with its error, cuDNN's refusals as
``unsupported: <reason>``, a program that would not fit in memory as skipped, and when
``--time_limit_s`` (the whole run's) is reached the cases left are listed as skipped. The
benchmark runs in a child process (``--isolate``): one that a kernel crashes (a Triton or
CUDA fault can end the process) is replaced, and that case records the crash. Writes
``gpu_check.json``, ``gpu_check.md``, ``gpu_check.png`` (TFLOP/s vs N) and
``conformance.log`` into ``--out_dir`` (default: ``$OUT`` if set, else ``runs/gpu_check``)
and prints the Markdown report::

    PYTHONPATH=. python3 experiments/gpu_check.py --out_dir=$OUT
    # a CPU smoke run: cuDNN is unsupported there, Pallas runs interpreted
    python experiments/gpu_check.py --seq_lens=128 --head_dims=32 --tokens=256 \\
        --hidden=64 --skip_conformance

It needs jax, numpy, absl, pytest (matplotlib for the plot, pytest-xdist to run the suite
in parallel) and nothing else: where hypothesis is missing the property tests are reported
as skipped. This module is also the pytest plugin of the conformance subprocess
(``-p experiments.gpu_check``), which records every test's outcome as it finishes, so that a
run stopped at the time cap still reports what ran.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import inspect
import itertools
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import pytest
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

from attn_jax import kernels  # noqa: E402
from attn_jax.kernels import api  # noqa: E402
from experiments import bench_kernels, reporting  # noqa: E402

PEERS = ("jax.nn.cudnn", "jax.nn.xla")
DEFAULT_KERNELS = ("pallas_flash", "flash", "dot_product", "auto", *PEERS)
DEFAULT_TESTS = ("tests/kernels/test_conformance.py", "tests/kernels/test_blockwise.py")
MODES = ("forward", "forward_backward")
DTYPES = ("bfloat16", "float16", "float32")
RESULTS_ENV = "GPU_CHECK_RESULTS"  # set for the conformance subprocess: where to record
KERNEL_MODULES_ENV = "ATTN_JAX_KERNEL_MODULES"  # as in tests/conftest.py: extra kernels
MAX_PROCESSES = 25  # benchmark processes started, crashed ones replaced, at most
CASE_GRACE_S = 120.0  # past the time limit, the benchmark process is killed after this
SAVE_EVERY_S = 10.0  # the isolated benchmark's rows so far are written this often


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command-line flags, on ``flag_values`` (defined only when run as a script, or by
    the tests on their own ``FlagValues``, so importing this module defines none)."""
    kw = {"flag_values": flag_values}
    flags.DEFINE_list(
        "seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths N.", **kw
    )
    flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions.", **kw)
    flags.DEFINE_list(
        "kernels",
        list(DEFAULT_KERNELS),
        "Contenders: registered dot_product kernels, 'auto' (the front end with "
        "implementation=None), jax.nn.cudnn, jax.nn.xla, flax.",
        **kw,
    )
    flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.", **kw)
    flags.DEFINE_list("modes", list(MODES), "What to time: forward, forward_backward.", **kw)
    flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Input dtype.", **kw)
    flags.DEFINE_integer("tokens", 16384, "Tokens per call: batch = max(1, tokens // N).", **kw)
    flags.DEFINE_integer("hidden", 2048, "heads * head_dim (heads = hidden // head_dim).", **kw)
    flags.DEFINE_integer("repeats", 5, "Timed runs per case after a warm-up (median; >= 5).", **kw)
    flags.DEFINE_float(
        "memory_fraction", 0.9, "Skip programs needing more of the device's memory.", **kw
    )
    flags.DEFINE_float(
        "time_limit_s",
        450.0,
        "Wall-clock limit of the whole run (conformance included): the benchmark cases left "
        "when it is reached are skipped and listed.",
        **kw,
    )
    flags.DEFINE_bool("skip_conformance", False, "Run only the benchmark.", **kw)
    flags.DEFINE_list("conformance_tests", list(DEFAULT_TESTS), "pytest paths (repo root).", **kw)
    flags.DEFINE_string("conformance_k", "", "pytest -k expression selecting tests.", **kw)
    flags.DEFINE_float("conformance_time_s", 150.0, "Time cap of the conformance run.", **kw)
    flags.DEFINE_integer(
        "conformance_workers",
        -1,
        "pytest-xdist workers (0: none; -1: half the CPU cores, at most 8, if xdist is there).",
        **kw,
    )
    flags.DEFINE_bool(
        "isolate",
        True,
        "Benchmark in a child process, replaced when a kernel crashes it (the crash is that "
        "case's error); false: in this process.",
        **kw,
    )
    flags.DEFINE_string(
        "out_dir", os.environ.get("OUT") or "runs/gpu_check", "Output directory (flat).", **kw
    )
    flags.DEFINE_string(
        "benchmark_job", "", "Internal: run a job file's cases (what --isolate starts).", **kw
    )


def flag_config(f: flags.FlagValues) -> dict[str, Any]:
    """The run's config from parsed flags; ``app.UsageError`` naming a bad flag."""
    import_kernel_modules()

    causal = reporting.true_false(f.causal, "causal")
    bad_modes = sorted(set(f.modes) - set(MODES))
    if bad_modes or not f.modes:
        raise app.UsageError(f"--modes: expected some of {list(MODES)}, got {f.modes}")
    if f.repeats < 5:
        raise app.UsageError(f"--repeats: at least 5 timed runs, got {f.repeats}")
    head_dims = reporting.positive_ints(f.head_dims, "head_dims", allow_empty=False)
    if f.hidden < 1 or any(f.hidden % d for d in head_dims):
        raise app.UsageError(f"--hidden={f.hidden}: must be a multiple of every head dim")
    if f.tokens < 1:
        raise app.UsageError(f"--tokens: expected a positive integer, got {f.tokens}")
    unknown = sorted(set(f.kernels) - set(contender_names()))
    if unknown or not f.kernels:
        raise app.UsageError(
            f"--kernels: unknown {unknown or 'empty list'}; available: {contender_names()}"
        )
    return {
        "seq_lens": reporting.positive_ints(f.seq_lens, "seq_lens", allow_empty=False),
        "head_dims": head_dims,
        "kernels": list(f.kernels),
        "causal": causal,
        "modes": list(f.modes),
        "dtype": f.dtype,
        "tokens": f.tokens,
        "hidden": f.hidden,
        "repeats": f.repeats,
        "memory_fraction": f.memory_fraction,
        "time_limit_s": f.time_limit_s,
        "skip_conformance": f.skip_conformance,
        "conformance_tests": list(f.conformance_tests),
        "conformance_k": f.conformance_k,
        "conformance_time_s": f.conformance_time_s,
        "conformance_workers": f.conformance_workers,
        "isolate": f.isolate,
        "out_dir": f.out_dir,
    }


def import_kernel_modules() -> None:
    """Imports the modules named in ``$ATTN_JAX_KERNEL_MODULES`` (comma-separated), which
    register extra kernels: they are then contenders, and the conformance suite checks them
    too (``tests/conftest.py`` reads the same variable)."""
    for module in filter(None, os.environ.get(KERNEL_MODULES_ENV, "").split(",")):
        importlib.import_module(module.strip())


# ------------------------------------------------------------------------------ benchmark


def problem_size(length: int, head_dim: int, tokens: int, hidden: int) -> tuple[int, int]:
    """``(batch, heads)`` of one case: ``tokens`` per call, ``heads * head_dim == hidden``."""
    return max(1, tokens // length), max(1, hidden // head_dim)


def tflops(
    batch: int, heads: int, length: int, head_dim: int, causal: bool, mode: str, seconds: float
) -> float:
    """TFLOP/s of one call by the FlashAttention convention
    (:func:`bench_kernels.attention_flops`)."""
    return (
        bench_kernels.attention_flops(batch, heads, length, head_dim, causal, mode) / seconds / 1e12
    )


def contenders(causal: bool) -> dict[str, Callable[..., jax.Array]]:
    """name -> ``fn(q, k, v)``: ``bench_kernels``'s contenders, with the Pallas kernels on
    every backend (interpreted off GPU), ``auto`` as the front end with
    ``implementation=None`` and ``jax.nn.cudnn`` everywhere (unsupported off GPU)."""
    table = bench_kernels.contenders(window=256, causal=causal)
    for name in kernels.available(interface="dot_product"):
        if name not in table:
            kernel = kernels.get(name)
            table[name] = lambda q, k, v, kernel=kernel: kernel(q, k, v, is_causal=causal)
    table["auto"] = lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=causal)
    table.setdefault(
        "jax.nn.cudnn",
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        ),
    )
    return table


def contender_names() -> list[str]:
    """The names :func:`contenders` knows (found without touching the device)."""
    return sorted({*kernels.available(interface="dot_product"), "auto", "flax", *PEERS})


def _auto_choice(shape: tuple[int, ...], dtype: str, causal: bool) -> str | None:
    """The kernel the front end dispatches ``shape`` to (traced abstractly: no data)."""
    chosen = []

    def trace(q):
        chosen.append(api.dispatch(api.bind(q, q, q, is_causal=causal)))
        return q

    try:
        jax.eval_shape(trace, jax.ShapeDtypeStruct(shape, dtype))
    except Exception:
        return None
    return chosen[0] if chosen else None


def measure_case(
    name: str,
    fn: Callable[..., jax.Array],
    *,
    length: int,
    head_dim: int,
    causal: bool,
    mode: str,
    batch: int,
    heads: int,
    dtype: str,
    repeats: int,
    budget: float,
) -> dict[str, Any]:
    """One contender on one problem: ``bench_kernels.measure`` plus TFLOP/s; never raises.

    ``status`` is ``ok``, ``failed`` (with ``error``), ``skipped`` (does not fit in memory)
    or, for ``jax.nn.cudnn``, ``unsupported`` (with the reason) when cuDNN refuses it
    before running.
    """
    backend = jax.default_backend()
    if name == "jax.nn.cudnn" and backend != "gpu":
        return {"status": "unsupported", "error": f"cuDNN needs a CUDA GPU (backend: {backend})"}
    start = time.perf_counter()
    try:
        result = bench_kernels.measure(
            fn,
            length=length,
            dim=head_dim,
            dtype=dtype,
            mode=mode,
            batch=batch,
            heads=heads,
            repeats=repeats,
            budget=budget,
        )
    except Exception as error:  # anything measure itself does not catch (inputs, OOM...)
        result = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:300]}
    result["wall_s"] = time.perf_counter() - start
    error = result.get("error", "")
    if name == "jax.nn.cudnn" and result["status"] == "failed" and error.startswith("compile: "):
        result.update(status="unsupported", error=error.removeprefix("compile: "))
    if result["status"] == "ok":
        result["tflops"] = tflops(batch, heads, length, head_dim, causal, mode, result["seconds"])
    jax.clear_caches()  # 240 cases: no compiled program outlives its case
    return result


def _describe(row: Mapping[str, Any]) -> str:
    head = (
        f"{row['kernel']:>14} {row['mode']:<16} D={row['head_dim']:<3} "
        f"{'causal' if row['causal'] else 'full  '} N={row['seq_len']:<6}"
    )
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('error', '')}"
    return f"{head} {row['seconds'] * 1e3:9.3f} ms {row['tflops']:8.2f} TFLOP/s"


Case = tuple[int, bool, str, int, str]  # head_dim, causal, mode, seq_len, kernel


def cases_of(config: Mapping[str, Any]) -> list[Case]:
    """Every case of ``config``, in the order they run."""
    return list(
        itertools.product(
            config["head_dims"],
            config["causal"],
            config["modes"],
            config["seq_lens"],
            config["kernels"],
        )
    )


def case_of(row: Mapping[str, Any]) -> Case:
    return (row["head_dim"], row["causal"], row["mode"], row["seq_len"], row["kernel"])


def case_row(config: Mapping[str, Any], case: Case) -> dict[str, Any]:
    """The row of ``case`` before it is measured: its problem size."""
    dim, causal, mode, length, name = case
    batch, heads = problem_size(length, dim, config["tokens"], config["hidden"])
    return {
        "kernel": name,
        "mode": mode,
        "head_dim": dim,
        "causal": causal,
        "seq_len": length,
        "batch": batch,
        "heads": heads,
        "dtype": config["dtype"],
    }


def _time_limit(config: Mapping[str, Any]) -> str:
    return f"time limit (--time_limit_s={config['time_limit_s']:g}) reached"


def benchmark(
    config: Mapping[str, Any],
    deadline: float,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    cases: Sequence[Case] | None = None,
) -> list[dict[str, Any]]:
    """``cases`` (default: all of ``config``) in this process until ``deadline``
    (``time.monotonic()``); the cases left then are rows with status ``skipped`` and the
    time limit as their error. ``on_row`` gets the rows so far after each new row."""
    tables = {causal: contenders(causal) for causal in config["causal"]}
    budget = config["memory_fraction"] * bench_kernels.available_bytes()
    cases = cases_of(config) if cases is None else list(cases)
    rows: list[dict[str, Any]] = []
    message = _time_limit(config)
    for index, case in enumerate(cases):
        row = case_row(config, case)
        dim, causal, mode, length, name = case
        batch, heads = row["batch"], row["heads"]
        if name == "auto":
            row["dispatch"] = _auto_choice((batch, length, heads, dim), config["dtype"], causal)
        if time.monotonic() >= deadline:
            if not any(r.get("error") == message for r in rows):
                print(f"{message}: skipping the {len(cases) - index} cases left", flush=True)
            rows.append({**row, "status": "skipped", "error": message})
            if on_row is not None:
                on_row(rows)
            continue
        row.update(
            measure_case(
                name,
                tables[causal][name],
                length=length,
                head_dim=dim,
                causal=causal,
                mode=mode,
                batch=batch,
                heads=heads,
                dtype=config["dtype"],
                repeats=config["repeats"],
                budget=budget,
            )
        )
        rows.append(row)
        print(_describe(row), flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


# ---------------------------------------------------------------------------- conformance


def conformance_command(config: Mapping[str, Any], workers: int) -> list[str]:
    """The pytest command of the conformance run (from the repository root)."""
    command = [sys.executable, "-m", "pytest", *config["conformance_tests"]]
    command += ["-p", "experiments.gpu_check", "-p", "no:cacheprovider"]
    # The project's warning filters name optuna's warning class, which pytest imports: where
    # optuna is not installed, pytest 8 warns at every test and older ones stop. Warnings
    # do not matter here.
    command += ["-p", "no:warnings", "-m", "not slow", "-q", "-rfE", "--tb=short"]
    if config["conformance_k"]:
        command += ["-k", config["conformance_k"]]
    if workers > 0:
        command += ["-n", str(workers), "--dist=load"]
    return command


def _workers(requested: int) -> int:
    if requested >= 0:
        return requested
    if importlib.util.find_spec("xdist") is None:
        return 0
    workers = min(8, (os.cpu_count() or 1) // 2)
    return workers if workers >= 2 else 0


def kernel_of(nodeid: str, names: Iterable[str]) -> str:
    """The kernel a test checks: a parameter of its id that is a kernel name, else the
    longest kernel name in the test function's name, else ``"(other)"``."""
    names = set(names)
    function, _, params = nodeid.partition("[")
    for token in params.rstrip("]").split("-") if params else []:
        if token in names:
            return token
    function = function.rsplit("::", 1)[-1]
    inside = [n for n in names if n in function]
    return max(inside, key=len) if inside else "(other)"


def summarise_conformance(
    records: Iterable[Mapping[str, Any]], kernel_names: Iterable[str]
) -> dict[str, Any]:
    """Per-kernel counts from the plugin's records (``{"collected": [ids]}`` and one
    ``{"nodeid", "when", "outcome", "message"}`` per test phase).

    A test is failed if any phase failed, skipped if one skipped, passed if its call passed,
    and else not run (never reached, or cut off by the time cap).
    """
    names = list(kernel_names)
    collected: list[str] = []
    phases: dict[str, dict[str, Mapping[str, Any]]] = {}
    for record in records:
        if "collected" in record:
            collected = list(record["collected"])
        else:
            phases.setdefault(record["nodeid"], {})[record["when"]] = record
    outcomes: dict[str, tuple[str, str]] = {}
    for nodeid in list(dict.fromkeys([*collected, *phases])):
        seen = phases.get(nodeid, {})
        failed = [r for r in seen.values() if r["outcome"] == "failed"]
        skipped = [r for r in seen.values() if r["outcome"] == "skipped"]
        if failed:
            when = "" if failed[0]["when"] == "call" else f"(in {failed[0]['when']}) "
            outcomes[nodeid] = ("failed", when + failed[0].get("message", ""))
        elif skipped:
            outcomes[nodeid] = ("skipped", skipped[0].get("message", ""))
        elif seen.get("call", {}).get("outcome") == "passed":
            outcomes[nodeid] = ("passed", "")
        else:
            outcomes[nodeid] = ("not_run", "")
    per_kernel: dict[str, dict[str, Any]] = {}
    for nodeid, (outcome, message) in outcomes.items():
        entry = per_kernel.setdefault(
            kernel_of(nodeid, names),
            {"passed": 0, "failed": 0, "skipped": 0, "not_run": 0, "failures": [], "skips": {}},
        )
        entry[outcome] += 1
        if outcome == "failed":
            entry["failures"].append({"test": nodeid, "message": _one_line(message, 500)})
        elif outcome == "skipped":
            reason = _one_line(message, 120)
            entry["skips"][reason] = entry["skips"].get(reason, 0) + 1
    totals = collections.Counter(outcome for outcome, _ in outcomes.values())
    return {
        "tests": len(outcomes),
        "totals": {k: totals.get(k, 0) for k in ("passed", "failed", "skipped", "not_run")},
        "kernels": dict(sorted(per_kernel.items())),
    }


def run_conformance(config: Mapping[str, Any], out_dir: pathlib.Path, cap_s: float) -> dict:
    """The conformance suite in a pytest subprocess (its output in ``conformance.log``),
    stopped after ``cap_s`` seconds; the per-kernel summary of what ran."""
    workers = _workers(config["conformance_workers"])
    command = conformance_command(config, workers)
    log_path = out_dir / "conformance.log"
    print(f"conformance: {' '.join(command[1:])} (cap {cap_s:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        results = pathlib.Path(tmp) / "results.jsonl"
        # Not the variables of a pytest run this one is inside (an xdist worker's would
        # make the subprocess's plugin believe it is one, and record nothing).
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PYTEST_XDIST_") and k != "PYTEST_CURRENT_TEST"
        }
        env = {
            **inherited,
            RESULTS_ENV: str(results),
            # Several processes share the GPU, and this one's benchmark comes after.
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        start = time.monotonic()
        timed_out, returncode = False, None
        with open(log_path, "w") as log:
            try:
                process = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: workers stop with it
                )
            except OSError as error:
                return {"status": "error", "error": f"could not start pytest: {error}"}
            try:
                returncode = process.wait(timeout=max(cap_s, 1.0))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.monotonic() - start
        records = _read_jsonl(results)
    summary = summarise_conformance(records, kernels.available())
    if timed_out:
        status = "time cap"
    elif summary["tests"] == 0 or returncode not in (0, 1):
        status = "error"
    else:
        status = "failed" if summary["totals"]["failed"] else "passed"
    report = {
        "status": status,
        "returncode": returncode,
        "seconds": seconds,
        "cap_s": cap_s,
        "workers": workers,
        "command": " ".join(command[1:]),
        **summary,
    }
    if status == "error":
        report["error"] = "pytest did not run the suite; end of conformance.log:\n" + _tail(
            log_path, 1500
        )
    print(f"conformance: {status} in {seconds:.0f} s, {summary['totals']}", flush=True)
    return report


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tail(path: pathlib.Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ------------------------------------------------------------------ the run and its report


def environment(device: bool = True) -> dict[str, Any]:
    """Versions and date of this run, and the device (``device``: this touches it)."""
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    first = jax.devices()[0] if device else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": f"{first.device_kind} ({first.platform}) x{jax.device_count()}"
        if first
        else "(not known: the benchmark process never started)",
        "backend": jax.default_backend() if device else None,
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    """Conformance (unless skipped), then the benchmark, within ``config["time_limit_s"]``;
    returns the JSON-able report. ``gpu_check.json`` / ``.md`` are rewritten after every
    case (``"complete": false`` until the end), so a run that dies midway (a GPU fault
    that kills the process, say) still leaves what it measured."""
    started = time.monotonic()
    deadline = started + config["time_limit_s"]
    out_dir = pathlib.Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if config["skip_conformance"]:
        conformance: dict[str, Any] = {"status": "skipped", "error": "--skip_conformance"}
    else:
        cap = min(config["conformance_time_s"], deadline - time.monotonic())
        conformance = run_conformance(config, out_dir, cap)
    # The device is first touched after the conformance subprocess has let go of it, and
    # with --isolate only by the benchmark's own processes.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(config["memory_fraction"]))
    report = {**environment(device=not config["isolate"]), "config": dict(config)}
    report.update(conformance=conformance, complete=False, rows=[], elapsed_s=0.0)

    def save(rows: list[dict[str, Any]]) -> None:
        report.update(rows=rows, elapsed_s=time.monotonic() - started)
        reporting.write_outputs(out_dir, "gpu_check", report, markdown(report))

    save([])
    if config["isolate"]:
        rows = benchmark_isolated(config, deadline, report, save)
    else:
        rows = benchmark(config, deadline, on_row=save)
    report.update(complete=True, rows=rows, elapsed_s=time.monotonic() - started)
    return report


def benchmark_isolated(
    config: Mapping[str, Any],
    deadline: float,
    report: dict[str, Any],
    save: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """The benchmark in a child process (``--benchmark_job``); when one dies (a kernel
    that crashes the process or the GPU), its case is recorded as failed and a new process
    runs the cases after it. The child's device description goes into ``report``, and
    ``save`` gets the rows so far every few seconds."""
    cases, rows = cases_of(config), []
    order = {c: i for i, c in enumerate(cases)}
    in_order = lambda rows: sorted(rows, key=lambda r: order[case_of(r)])
    with tempfile.TemporaryDirectory(prefix="gpu_check_bench_") as tmp:
        for attempt in itertools.count():
            done = {case_of(r) for r in rows}
            left = [c for c in cases if c not in done]
            if not left:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or attempt >= MAX_PROCESSES:
                why = _time_limit(config) if remaining <= 0 else "too many crashed processes"
                print(f"{why}: skipping the {len(left)} cases left", flush=True)
                rows += [{**case_row(config, c), "status": "skipped", "error": why} for c in left]
                break
            job = pathlib.Path(tmp) / f"job{attempt}.json"
            results = job.with_suffix(".jsonl")
            job.write_text(json.dumps({"config": config, "cases": left, "seconds": remaining}))

            command = [sys.executable, str(pathlib.Path(__file__).resolve())]
            process = subprocess.Popen(
                [*command, f"--benchmark_job={job}"], cwd=ROOT, env=_child_env()
            )
            kill_at = time.monotonic() + remaining + CASE_GRACE_S
            returncode = None
            while returncode is None:
                try:
                    returncode = process.wait(timeout=SAVE_EVERY_S)
                except subprocess.TimeoutExpired:
                    save(in_order(rows + _job_rows(results, report)))
                    if time.monotonic() > kill_at:
                        process.kill()
                        process.wait()
                        break
            if returncode is None:
                died = f"killed {CASE_GRACE_S:.0f} s after the time limit"
            else:
                died = f"exit code {returncode}" if returncode >= 0 else f"signal {-returncode}"
            began = any("environment" in r for r in _read_jsonl(results))
            ran = _job_rows(results, report)
            rows += ran
            if returncode == 0:
                continue  # every case it was given is in its records
            measured = {case_of(r) for r in ran}
            crashed = next((c for c in left if c not in measured), None)
            if crashed is None:
                continue  # it died after its last case
            error = (
                f"the benchmark process died ({died}) while measuring this case"
                if began
                else f"the benchmark process failed to start ({died})"
            )
            rows.append({**case_row(config, crashed), "status": "failed", "error": error})
            print(f"{_describe(rows[-1])}; going on in a new process", flush=True)
            save(in_order(rows))
            if not began:
                rows += [
                    {**case_row(config, c), "status": "failed", "error": error}
                    for c in left
                    if c != crashed
                ]
                break
    return in_order(rows)


def _job_rows(results: pathlib.Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows a benchmark process has written so far (its environment into ``report``)."""
    records = _read_jsonl(results)
    for record in records:
        if "environment" in record:
            report.update(record["environment"])
    return [r for r in records if "environment" not in r]


def run_job(path: str) -> None:
    """The child of :func:`benchmark_isolated`: the job's cases, each row appended to
    ``<job>.jsonl`` as it is measured (after a first ``{"environment": ...}`` record)."""
    job = json.loads(pathlib.Path(path).read_text())
    results = pathlib.Path(path).with_suffix(".jsonl")
    deadline = time.monotonic() + job["seconds"]
    config = job["config"]

    def append(entry: Mapping[str, Any]) -> None:
        with open(results, "a") as f:
            f.write(json.dumps(entry) + "\n")

    append({"environment": environment()})
    cases = [tuple(c) for c in job["cases"]]
    benchmark(config, deadline, on_row=lambda rows: append(rows[-1]), cases=cases)


def _child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut off by a crash is dropped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _cell(row: Mapping[str, Any]) -> str:
    if row["status"] == "ok":  # 312.5, 3.14, 0.00512 (CPU smoke runs)
        return f"{row['tflops']:.1f}" if row["tflops"] >= 10 else f"{row['tflops']:.3g}"
    if row["status"] == "skipped":
        return "time limit" if "time limit" in row.get("error", "") else "no memory"
    return row["status"]


def _name(row: Mapping[str, Any]) -> str:
    return f"auto → {row['dispatch']}" if row.get("dispatch") else row["kernel"]


def benchmark_markdown(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    """The TFLOP/s table (one row per mode, head dim, causal flag and kernel; one column
    per N) and the problems, grouped by kernel, status and error."""
    lengths = list(config["seq_lens"])
    cells: dict[tuple, dict[int, str]] = {}
    for r in rows:
        key = (r["mode"], r["head_dim"], r["causal"], r["kernel"])
        cells.setdefault(key, {})[r["seq_len"]] = _cell(r)
    names = {(r["mode"], r["head_dim"], r["causal"], r["kernel"]): _name(r) for r in rows}
    order = {name: i for i, name in enumerate(config["kernels"])}
    keys = sorted(cells, key=lambda k: (MODES.index(k[0]), k[1], k[2], order.get(k[3], 99)))
    table = [
        [mode, dim, "yes" if causal else "no", names[(mode, dim, causal, kernel)]]
        + [cells[(mode, dim, causal, kernel)].get(n, "") for n in lengths]
        for mode, dim, causal, kernel in keys
    ]
    header = ["mode", "D", "causal", "kernel", *[f"N={n}" for n in lengths]]
    out = [reporting.markdown_table(header, table)]
    problems: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            where = (
                f"{r['mode']} D={r['head_dim']}{' causal' if r['causal'] else ''} N={r['seq_len']}"
            )
            key = (r["kernel"], r["status"], _one_line(r.get("error", ""), 300))
            problems.setdefault(key, []).append(where)
    if problems:
        out.append("\nNot measured:\n")
        for (kernel, status, error), where in problems.items():
            shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
            out.append(f"- `{kernel}` {status} in {len(where)} case(s) ({shown}): {error}")
        out.append("")
    return "\n".join(out)


def conformance_markdown(conformance: Mapping[str, Any]) -> str:
    """The per-kernel pass / fail table of the conformance run."""
    status = conformance["status"]
    if status == "skipped":
        return "Not run (`--skip_conformance`).\n"
    if "kernels" not in conformance:
        return f"**{status}**: {conformance.get('error', '')}\n"
    t = conformance["totals"]
    lines = [
        f"**{status}**: {conformance['tests']} tests in {conformance['seconds']:.0f} s (cap "
        f"{conformance['cap_s']:.0f} s, {conformance['workers']} workers): {t['passed']} "
        f"passed, {t['failed']} failed, {t['skipped']} skipped, {t['not_run']} not run. "
        f"`{conformance['command']}`",
        "",
    ]
    if status == "time cap":
        lines += ["The time cap stopped the run: 'not run' tests were never reached.", ""]
    if conformance.get("error"):
        lines += ["```", conformance["error"], "```", ""]
    table = []
    for name, k in conformance["kernels"].items():
        first = k["failures"][0] if k["failures"] else None
        note = (
            f"`{first['test'].split('::')[-1]}`: {_one_line(first['message'], 160)}"
            if first
            else ""
        )
        table.append([name, k["passed"], k["failed"], k["skipped"], k["not_run"], note])
    header = ["kernel", "passed", "failed", "skipped", "not run", "first failure"]
    lines.append(reporting.markdown_table(header, table))
    reasons: collections.Counter[str] = collections.Counter()
    for k in conformance["kernels"].values():
        reasons.update(k["skips"])
    if reasons:
        lines.append(
            "Skipped because: " + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(5))
        )
        lines.append("")
    return "\n".join(lines)


def markdown(report: Mapping[str, Any]) -> str:
    """The whole report: environment, conformance, TFLOP/s table, problems."""
    config = report["config"]
    skipped = sum("time limit" in r.get("error", "") for r in report["rows"])
    lines = [
        "# GPU check",
        "",
        f"{report['date']} on {report['device']}, jax {report['jax']} (jaxlib "
        f"{report['jaxlib']}), Python {report['python']}, {report['host']}; "
        f"{report['elapsed_s']:.0f} s in all (limit {config['time_limit_s']:g} s).",
        "",
    ]
    if not report.get("complete", True):
        lines += ["**Partial: the run had not finished when this was written.**", ""]
    lines += [
        "## Conformance (native)",
        "",
        conformance_markdown(report["conformance"]),
        "## Speed: TFLOP/s",
        "",
        f"{config['dtype']}, {config['tokens']} tokens per call (batch = max(1, "
        f"{config['tokens']} // N)), heads = {config['hidden']} // D; median of "
        f"{config['repeats']} runs after a warm-up. FlashAttention's FLOP count: forward "
        "4 * batch * heads * N^2 * D (causal: half), forward_backward 3.5x that.",
        "",
    ]
    if skipped:
        lines += [f"**The time limit was reached: {skipped} case(s) not run.**", ""]
    lines.append(benchmark_markdown(report["rows"], config))
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """TFLOP/s vs N, one panel per mode, head dim and causal flag; ``None`` without
    matplotlib or measurements."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        return None
    config = report["config"]
    settings = [(d, c) for d in config["head_dims"] for c in config["causal"]]
    modes = config["modes"]
    fig, axes = plt.subplots(
        len(modes), len(settings), figsize=(4 * len(settings), 3.5 * len(modes)), squeeze=False
    )
    for (i, mode), (j, (dim, causal)) in itertools.product(enumerate(modes), enumerate(settings)):
        ax = axes[i][j]
        for name in config["kernels"]:
            points = sorted(
                (r["seq_len"], r["tflops"])
                for r in rows
                if (r["kernel"], r["mode"], r["head_dim"], r["causal"]) == (name, mode, dim, causal)
            )
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=name)
        ax.set(
            xlabel="N",
            ylabel="TFLOP/s",
            title=f"{mode}, D={dim}{', causal' if causal else ''}",
        )
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}, {config['dtype']}")
    fig.tight_layout()
    saved = reporting.save_figure(fig, path)
    plt.close(fig)
    return saved


def write_report(report: Mapping[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.png`` in ``out_dir``."""
    paths = list(reporting.write_outputs(out_dir, "gpu_check", report, markdown(report)))
    png = plot(report, out_dir / "gpu_check.png")
    return paths + ([png] if png else [])


def main(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> dict[str, Any]:
    """Runs the check with the parsed flags (``flags.FLAGS`` unless given); prints the
    Markdown report and returns the JSON one."""
    reporting.start(argv)  # no positional arguments; absl logging at WARNING
    config = flag_config(flag_values if flag_values is not None else flags.FLAGS)
    report = run(config)
    out_dir = pathlib.Path(config["out_dir"])
    paths = write_report(report, out_dir)
    print("\n" + markdown(report))
    written = [p.name for p in paths] + ["conformance.log"] * (not config["skip_conformance"])
    print(f"wrote {', '.join(written)} in {out_dir}")
    return report


# -------------------------------------------------- pytest plugin (conformance subprocess)

_collection_recorded = False


def _record(entry: Mapping[str, Any]) -> None:
    """Appends ``entry`` to the results file (the controller only, not xdist workers)."""
    path = os.environ.get(RESULTS_ENV)
    if path and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _report_message(report: Any) -> str:
    if report.passed:
        return ""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return str(crash.message)[:1000]
    return str(longrepr)[-1000:]


class _Inert:
    """Whatever a test module does with hypothesis at import time: calls and attributes
    give this object again, and as a decorator it returns the function unchanged."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self


def _skipping_given(*_: Any, **arguments: Any) -> Callable[[Callable[..., Any]], Any]:
    """``hypothesis.given`` where hypothesis is missing: the test skips, saying why, and
    keeps its other parameters (for ``pytest.mark.parametrize``)."""

    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(test)

        def skipped(*args: Any, **kwargs: Any) -> None:
            pytest.skip("hypothesis is not installed: property test not run")

        skipped.__name__, skipped.__qualname__ = test.__name__, test.__qualname__
        skipped.__module__ = test.__module__
        skipped.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for n, p in signature.parameters.items() if n not in arguments]
        )
        return skipped

    return decorate


def hypothesis_stub() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries standing in for hypothesis (``hypothesis`` and
    ``hypothesis.strategies``): the suite imports, its property tests skip."""
    inert = _Inert()
    strategies = types.ModuleType("hypothesis.strategies")
    strategies.composite = lambda fn: lambda *a, **k: inert  # type: ignore[attr-defined]
    strategies.__getattr__ = lambda name: inert  # type: ignore[attr-defined]
    stub = types.ModuleType("hypothesis")
    stub.given = _skipping_given  # type: ignore[attr-defined]
    stub.strategies = strategies  # type: ignore[attr-defined]
    stub.__getattr__ = lambda name: inert  # type: ignore[attr-defined]
    return {"hypothesis": stub, "hypothesis.strategies": strategies}


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    """Before ``tests/conftest.py`` imports hypothesis: a stand-in where it is missing."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        sys.modules.update(hypothesis_stub())


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """The Pallas kernels' tests first (what the GPU changes most), else in file order."""
    items.sort(key=lambda item: "pallas" not in item.nodeid)


def pytest_collection_finish(session: Any) -> None:
    global _collection_recorded
    if session.items and not _collection_recorded:
        _collection_recorded = True
        _record({"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: Sequence[str]) -> None:
    global _collection_recorded
    if not _collection_recorded:
        _collection_recorded = True
        _record({"collected": list(ids)})


def pytest_runtest_logreport(report: Any) -> None:
    """Each test phase's outcome, as it finishes."""
    _record(
        {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": round(report.duration, 3),
            "message": _report_message(report),
        }
    )


def _script(argv: Sequence[str]) -> None:
    if flags.FLAGS.benchmark_job:
        reporting.start(argv)
        import_kernel_modules()
        run_job(flags.FLAGS.benchmark_job)
    else:
        main(argv)


if __name__ == "__main__":
    define_flags()
    app.run(_script)
