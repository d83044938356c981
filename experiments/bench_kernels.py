"""Speed and memory of every attention kernel against jax.nn and flax, in one process.

For each contender (every registered ``dot_product``-interface kernel (Pallas ones on GPU
only: elsewhere they run in the interpreter), ``auto`` (the front end with
``implementation=None``: what its dispatch table picks), plus the peers
``jax.nn.dot_product_attention`` with ``implementation="xla"`` (and ``"cudnn"`` on GPU) and
``flax.linen.dot_product_attention``), sequence length, head dim, causal flag, dtype and
mode (forward, forward + backward), it records:

- the median wall time of at least 5 runs after a warm-up (``block_until_ready``), the
  contenders of one problem timed in turn (so a change in the machine's load hits them
  alike);
- GFLOP/s by the FlashAttention convention (forward ``4 * B * H * N^2 * D``, halved when
  causal, backward 2.5x forward). Sliding-window, linear and Performer kernels do less
  work: their figure is *effective* GFLOP/s, i.e. full attention's count over their time;
- compiled scratch memory, ``memory_analysis().temp_size_in_bytes``;
- the machine's own matmul GFLOP/s, measured in the same run, as the roofline.

A contender whose compiled program would not fit in memory is reported as skipped; one that
fails at run time is reported as failed. Outputs ``bench.json``, ``bench.md`` and
``bench_time.png`` / ``bench_memory.png`` (log-log, vs length) in ``--out_dir``::

    python experiments/bench_kernels.py --quick
    python experiments/bench_kernels.py --seq_lens=4096 --causal=false --dtypes=float32
    python experiments/bench_kernels.py --seq_lens=4096 --segments=1,8 --kernels=flash,chunked

``--segments=8`` packs 8 equal sequences per row: blocks across segments are hidden and
skipped (the time should fall by about the number of segments).
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import kernels


def define_flags() -> None:
    """The command-line flags (defined only when run as a script, so importing this module
    never clashes with other absl programs)."""
    flags.DEFINE_bool("quick", False, "A ~1 minute run: lengths 512 and 1024, float32.")
    flags.DEFINE_list(
        "kernels", None, "Contenders (default: every dot_product kernel and the peers)."
    )
    flags.DEFINE_list(
        "seq_lens",
        ["512", "1024", "2048", "4096", "8192", "16384", "32768", "65536"],
        "Lengths.",
    )
    flags.DEFINE_list("head_dims", ["64"], "Head dimensions.")
    flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes.")
    flags.DEFINE_list("modes", ["forward", "forward_backward"], "What to time.")
    flags.DEFINE_integer("batch", 1, "Batch size.")
    flags.DEFINE_integer("heads", 8, "Attention heads.")
    flags.DEFINE_integer("window", 256, "sliding_window: keys on each side.")
    flags.DEFINE_list(
        "segments",
        ["1"],
        "Packed segments per sequence (equal lengths; > 1: only kernels that take segment "
        "ids, whose blocks across segments are hidden and skipped).",
    )
    flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median; >= 5).")
    flags.DEFINE_float(
        "memory_fraction", 0.8, "Skip programs needing more than this fraction of memory."
    )
    flags.DEFINE_string("out_dir", "runs/bench_kernels", "Output directory.")


def _segment_ids(length: int, segments: int) -> jax.Array:
    """``[length]`` ids of ``segments`` equal consecutive segments."""
    return jnp.arange(length, dtype=jnp.int32) * segments // length


def contenders(window: int, causal: bool, segments: int = 1) -> dict[str, Callable[..., jax.Array]]:
    """name -> ``fn(q, k, v)`` for every available contender (with ``segments > 1``, only
    the kernels that take segment ids)."""
    extra: dict[str, dict[str, Any]] = {
        "sliding_window": {"local_window_size": (window, 0 if causal else window)},
        "performer": {"rng": jax.random.key(0)},
    }
    if segments > 1:
        out = {}
        for name in kernels.available(interface="dot_product"):
            if not kernels.capabilities(name).segments or (
                name.startswith("pallas") and jax.default_backend() != "gpu"
            ):
                continue
            kernel, kwargs = kernels.get(name), {"is_causal": causal, **extra.get(name, {})}
            out[name] = lambda q, k, v, kernel=kernel, kwargs=kwargs: kernel(
                q, k, v, query_segment_ids=_segment_ids(q.shape[1], segments), **kwargs
            )
        return out
    out: dict[str, Callable[..., jax.Array]] = {
        "auto": lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=causal),
        "jax.nn.xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
    }
    if jax.default_backend() == "gpu":
        out["jax.nn.cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        )

    def flax_attention(q, k, v):
        import flax.linen as nn

        mask = nn.make_causal_mask(jnp.ones(q.shape[:2]), dtype=bool) if causal else None
        return nn.dot_product_attention(q, k, v, mask=mask)

    out["flax"] = flax_attention
    for name in kernels.available(interface="dot_product"):
        if name.startswith("pallas") and jax.default_backend() != "gpu":
            continue  # the Pallas interpreter is a correctness tool, not a contender
        kernel = kernels.get(name)
        kwargs = {"is_causal": causal, **extra.get(name, {})}
        out[name] = lambda q, k, v, kernel=kernel, kwargs=kwargs: kernel(q, k, v, **kwargs)
    return out


def attention_flops(
    batch: int, heads: int, length: int, dim: int, causal: bool, mode: str
) -> float:
    """FlashAttention convention: ``4 B H N^2 D`` forward, halved if causal, x3.5 with
    the backward pass (2.5x forward)."""
    forward = 4.0 * batch * heads * length * length * dim * (0.5 if causal else 1.0)
    return forward * (3.5 if mode == "forward_backward" else 1.0)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(repeats: int, size: int = 2048) -> float:
    """The machine's float32 matmul rate, the roofline of every row."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    return 2 * size**3 / _median_seconds(lambda: matmul(a), repeats) / 1e9


def available_bytes() -> int:
    """Memory a program may use: the accelerator's, or the host's physical memory."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def prepare(
    fn: Callable[..., jax.Array],
    *,
    length: int,
    dim: int,
    dtype: str,
    mode: str,
    batch: int,
    heads: int,
    budget: float,
) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """One contender on one problem, compiled: its result so far (status, scratch memory)
    and a function running it once (``None`` if it failed or does not fit)."""
    shape = (batch, length, heads, dim)
    q, k, v = (
        jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype) for i in range(3)
    )
    if mode == "forward":
        program = jax.jit(fn)
    else:
        program = jax.jit(
            jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        )
    try:
        compiled = program.lower(q, k, v).compile()
    except Exception as error:
        failed = {"status": "failed", "error": f"compile: {type(error).__name__}: {error}"[:300]}
        return failed, None
    analysis = compiled.memory_analysis()
    scratch = int(analysis.temp_size_in_bytes) if analysis is not None else None
    needed = (scratch or 0) + 4 * q.nbytes
    if needed > budget:
        skipped = {"status": "skipped", "scratch_bytes": scratch, "error": "does not fit in memory"}
        return skipped, None
    return {"status": "ok", "scratch_bytes": scratch}, lambda: compiled(q, k, v)


def take_turns(runs: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each run, the runs timed in turn ``repeats`` times, so a change in
    the machine's load hits them alike; the order reverses every round, so that no run
    always follows the same one."""
    times: list[list[float]] = [[] for _ in runs]
    for round_ in range(repeats):
        order = list(zip(runs, times, strict=True))
        for run, mine in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(run())
            mine.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def time_in_turn(runs: list[Callable[[], Any]], repeats: int) -> list[float | Exception]:
    """:func:`take_turns` after a warm-up of each run; a run whose warm-up raises gives
    its error instead and is not timed."""
    errors: list[Exception | None] = []
    for run in runs:
        try:
            jax.block_until_ready(run())  # warm-up
            errors.append(None)
        except Exception as error:
            errors.append(error)
    ready = [run for run, error in zip(runs, errors, strict=True) if error is None]
    seconds = iter(take_turns(ready, repeats))
    return [next(seconds) if error is None else error for error in errors]


def measure(fn: Callable[..., jax.Array], *, repeats: int, **problem: Any) -> dict[str, Any]:
    """Time and scratch memory of one contender on one problem (the arguments of
    :func:`prepare`)."""
    return _timed([prepare(fn, **problem)], repeats)[0]


def _timed(prepared: list[tuple[dict[str, Any], Any]], repeats: int) -> list[dict[str, Any]]:
    """The results of :func:`prepare`d contenders, those that run timed in turn."""
    ready = [i for i, (_, run) in enumerate(prepared) if run is not None]
    seconds = time_in_turn([prepared[i][1] for i in ready], repeats)
    results = [dict(result) for result, _ in prepared]
    for i, s in zip(ready, seconds, strict=True):
        if isinstance(s, Exception):
            results[i].update(status="failed", error=str(s)[:300])
        else:
            results[i]["seconds"] = s
    return results


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Every measurement of ``config``; returns the JSON-able report."""
    roofline = matmul_gflops(config["repeats"])
    budget = config["memory_fraction"] * available_bytes()
    rows = []
    for causal, segments in itertools.product(config["causal"], config.get("segments", [1])):
        table = contenders(config["window"], causal, segments)
        names = config["kernels"] or list(table)
        unknown = sorted(set(names) - set(table))
        if segments > 1:
            names = [n for n in names if n in table]
        elif unknown:
            raise ValueError(f"--kernels: unknown {unknown}; available: {sorted(table)}")
        for dtype, dim, mode in itertools.product(
            config["dtypes"], config["head_dims"], config["modes"]
        ):
            too_big: set[str] = set()  # skipped at a shorter length: longer will not fit
            for length in config["seq_lens"]:
                live = [n for n in names if n not in too_big]
                problem = {"length": length, "dim": dim, "dtype": dtype, "mode": mode,
                           "batch": config["batch"], "heads": config["heads"],
                           "budget": budget}  # fmt: skip
                prepared = [prepare(table[name], **problem) for name in live]
                for name, result in zip(live, _timed(prepared, config["repeats"]), strict=True):
                    row = {
                        "kernel": name,
                        "length": length,
                        "head_dim": dim,
                        "causal": causal,
                        "segments": segments,
                        "dtype": dtype,
                        "mode": mode,
                        **result,
                    }
                    if row["status"] == "ok":
                        flops = attention_flops(
                            config["batch"], config["heads"], length, dim, causal, mode
                        )
                        row["gflops"] = flops / row["seconds"] / 1e9
                    elif row["status"] == "skipped":
                        too_big.add(name)
                    rows.append(row)
                    print(_describe(row), flush=True)
                del prepared
    _add_ratios(rows)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "matmul_gflops": roofline,
        "config": config,
        "rows": rows,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up and memory ratio of each row against jax.nn (xla) on the same problem."""
    key = lambda r: (
        r["length"],
        r["head_dim"],
        r["causal"],
        r["dtype"],
        r["mode"],
        r.get("segments", 1),
    )
    base = {key(r): r for r in rows if r["kernel"] == "jax.nn.xla" and r["status"] == "ok"}
    for row in rows:
        ref = base.get(key(row))
        if ref is None or row["status"] != "ok":
            continue
        row["speedup_vs_jax_nn"] = ref["seconds"] / row["seconds"]
        if row.get("scratch_bytes") and ref.get("scratch_bytes"):
            row["scratch_vs_jax_nn"] = row["scratch_bytes"] / ref["scratch_bytes"]


def _machine() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.machine()} {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} cores, jax {jax.__version__}"
    )


def _describe(row: dict[str, Any]) -> str:
    head = (
        f"{row['kernel']:>15} N={row['length']:<6} D={row['head_dim']} "
        f"{'causal' if row['causal'] else 'full  '} S={row.get('segments', 1)} "
        f"{row['dtype']:<8} {row['mode']:<16}"
    )
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('error', '')}"
    mib = (row["scratch_bytes"] or 0) / 2**20
    return f"{head} {row['seconds'] * 1e3:9.2f} ms {row['gflops']:7.1f} GFLOP/s {mib:9.1f} MiB"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}; matmul roofline "
        f"{report['matmul_gflops']:.1f} GFLOP/s (float32).",
        "",
        "| kernel | N | D | causal | segments | dtype | mode | ms | GFLOP/s | % matmul "
        "| scratch MiB | speed-up vs jax.nn | scratch vs jax.nn |",
        "| --- " * 13 + "|",
    ]
    for r in report["rows"]:
        cells = [r["kernel"], r["length"], r["head_dim"], r["causal"], r.get("segments", 1)]
        cells += [r["dtype"], r["mode"]]
        if r["status"] != "ok":
            cells += [r["status"], "", "", "", "", ""]
        else:
            cells += [
                f"{r['seconds'] * 1e3:.1f}",
                f"{r['gflops']:.1f}",
                f"{100 * r['gflops'] / report['matmul_gflops']:.0f}%",
                f"{(r['scratch_bytes'] or 0) / 2**20:.1f}",
                f"{r['speedup_vs_jax_nn']:.2f}x" if "speedup_vs_jax_nn" in r else "",
                f"{r['scratch_vs_jax_nn']:.3f}" if "scratch_vs_jax_nn" in r else "",
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    settings = sorted({(r["causal"], r["dtype"], r["mode"], r["head_dim"]) for r in rows}, key=str)
    for metric, label, filename in (
        ("seconds", "time (s)", "bench_time.png"),
        ("scratch_bytes", "scratch memory (bytes)", "bench_memory.png"),
    ):
        fig, axes = plt.subplots(
            1, max(len(settings), 1), figsize=(5 * max(len(settings), 1), 4), squeeze=False
        )
        for ax, setting in zip(axes[0], settings, strict=False):
            for name in sorted({r["kernel"] for r in rows}):
                points = sorted(
                    (r["length"], r[metric])
                    for r in rows
                    if r["kernel"] == name
                    and (r["causal"], r["dtype"], r["mode"], r["head_dim"]) == setting
                    and r.get(metric)
                )
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", label=name)
            causal, dtype, mode, dim = setting
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="sequence length",
                ylabel=label,
                title=f"{mode}, {dtype}, D={dim}{', causal' if causal else ''}",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=100)
        plt.close(fig)


def _flag_config(f: Any) -> dict[str, Any]:
    """The run's config from parsed flag values (``f.NAME``)."""

    def ints(values: list[str], flag: str) -> list[int]:
        try:
            out = [int(v) for v in values]
        except ValueError:
            raise app.UsageError(f"--{flag}: expected integers, got {values}") from None
        if any(v < 1 for v in out):
            raise app.UsageError(f"--{flag}: expected positive integers, got {values}")
        return out

    causal = []
    for value in f.causal:
        if value.lower() not in ("true", "false"):
            raise app.UsageError(f"--causal: expected true/false values, got {value!r}")
        causal.append(value.lower() == "true")
    for mode in f.modes:
        if mode not in ("forward", "forward_backward"):
            raise app.UsageError(f"--modes: expected forward/forward_backward, got {mode!r}")
    for dtype in f.dtypes:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise app.UsageError(f"--dtypes: expected float32/bfloat16/float16, got {dtype!r}")
    if f.repeats < 5:
        raise app.UsageError(f"--repeats: at least 5 runs, got {f['repeats'].value}")
    config = {
        "kernels": f.kernels,
        "seq_lens": ints(f.seq_lens, "seq_lens"),
        "head_dims": ints(f.head_dims, "head_dims"),
        "causal": causal,
        "dtypes": f.dtypes,
        "modes": f.modes,
        "batch": f.batch,
        "heads": f.heads,
        "window": f.window,
        "segments": ints(f.segments, "segments"),
        "repeats": f.repeats,
        "memory_fraction": f.memory_fraction,
    }
    if f.quick:
        config.update(seq_lens=[512, 1024], dtypes=["float32"], causal=[False], head_dims=[64])
    return config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    config = _flag_config(values)
    out_dir = pathlib.Path(values.out_dir)
    report = run(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench.md").write_text(markdown(report))
    plot(report, out_dir)
    print(f"wrote {out_dir}/bench.json, bench.md, bench_time.png, bench_memory.png")


if __name__ == "__main__":
    define_flags()
    app.run(main)
