"""Ring attention scaling: how long a sequence fits on 1, 2, 4 and 8 devices.

For each ring size P, the longest sequence N (a multiple of ``P * granule``) whose
forward + backward pass (gradients for query, key and value) fits a per-device memory
budget, read from the compiled program (``memory_analysis()``: scratch + arguments +
outputs of one device; nothing is run); and the per-device scratch for a list of lengths.
``jax.nn.dot_product_attention`` on one device gives the reference point. The devices are
8 simulated CPU devices (set here before jax loads) unless ``JAX_PLATFORMS`` names another
platform, e.g. ``JAX_PLATFORMS=cuda`` on a machine with several GPUs. Writes
``bench_ring.json``, ``bench_ring.md`` and ``bench_ring.png``::

    python experiments/bench_ring.py                       # one to two minutes, 2 cores
    python experiments/bench_ring.py --budget_mib=1024 --devices=1,8
"""

from __future__ import annotations

import os

if not os.environ.get("JAX_PLATFORMS"):  # simulated devices: memory figures, not speed
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import kernels

MIB = 2**20


def footprint(
    attention: Callable[..., jax.Array], length: int, *, batch: int, heads: int, head_dim: int
) -> dict[str, float]:
    """Per-device MiB of the compiled forward + backward of ``attention(q, k, v)`` at
    ``length``: ``scratch``, and ``total`` (scratch + arguments + outputs)."""
    shape = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape).compile()
    stats = compiled.memory_analysis()
    scratch = stats.temp_size_in_bytes
    total = scratch + stats.argument_size_in_bytes + stats.output_size_in_bytes
    return {"scratch": scratch / MIB, "total": total / MIB}


def longest_fitting(
    attention: Callable[..., jax.Array],
    budget_mib: float,
    step: int,
    limit: int,
    **sizes: int,
) -> tuple[int, dict[str, float] | None]:
    """The longest multiple of ``step`` up to ``limit`` whose footprint fits the budget
    (doubling, then bisection), and that footprint; ``(0, None)`` if none fits."""
    fits = lambda n: footprint(attention, n, **sizes)["total"] <= budget_mib
    if not fits(step):
        return 0, None
    low, high = step, 2 * step
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + step)
    while high - low > step:  # low fits, high does not (or is past the limit)
        middle = (low + high) // (2 * step) * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, footprint(attention, low, **sizes)


def ring(devices: int, causal: bool, block: int) -> Callable[..., jax.Array]:
    return lambda q, k, v: kernels.ring_attention(
        q, k, v, num_devices=devices, is_causal=causal, block_q=block, block_k=block
    )


def run(
    *,
    devices: Sequence[int],
    budget_mib: float,
    lengths: Sequence[int],
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    causal: bool = False,
    block: int = 512,
    granule: int = 256,
    limit: int = 1 << 20,
    out_dir: str | pathlib.Path = "runs/bench_ring",
) -> dict[str, Any]:
    """Measures every ring size; writes and returns the report."""
    sizes = {"batch": batch, "heads": heads, "head_dim": head_dim}
    rows = []
    for n in devices:
        longest, at_longest = longest_fitting(
            ring(n, causal, block), budget_mib, n * granule, limit, **sizes
        )
        scratch = {
            length: footprint(ring(n, causal, block), length, **sizes)["scratch"]
            for length in lengths
            if length % n == 0
        }
        rows.append(
            {"devices": n, "longest": longest, "at_longest": at_longest, "scratch": scratch}
        )
    reference = jax.nn.dot_product_attention
    longest, at_longest = longest_fitting(
        lambda q, k, v: reference(q, k, v, is_causal=causal), budget_mib, granule, limit, **sizes
    )
    report = {
        "rows": rows,
        "jax_nn_one_device": {"longest": longest, "at_longest": at_longest},
        "budget_mib": budget_mib,
        "sizes": {**sizes, "causal": causal, "block": block, "dtype": "float32"},
        "backend": jax.default_backend(),
    }
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_ring.json").write_text(json.dumps(report, indent=1))
    (out_dir / "bench_ring.md").write_text(markdown(report))
    _figure(report, out_dir / "bench_ring.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    base = report["rows"][0]["longest"] or 1
    text = (
        f"Longest sequence whose forward + backward fits {report['budget_mib']:g} MiB per "
        f"device (float32, batch {sizes['batch']}, {sizes['heads']} heads, head_dim "
        f"{sizes['head_dim']}, {'causal' if sizes['causal'] else 'non-causal'}, tiles "
        f"{sizes['block']}):\n\n"
        "| devices | longest sequence | vs 1 device | per-device total MiB at it |\n"
        "| --- | --- | --- | --- |\n"
    )
    for row in report["rows"]:
        total = row["at_longest"]["total"] if row["at_longest"] else float("nan")
        text += (
            f"| {row['devices']} | {row['longest']:,} | {row['longest'] / base:.2f}x | "
            f"{total:.1f} |\n"
        )
    ref = report["jax_nn_one_device"]
    text += f"| jax.nn, 1 device | {ref['longest']:,} | {ref['longest'] / base:.2f}x | "
    text += f"{ref['at_longest']['total'] if ref['at_longest'] else float('nan'):.1f} |\n"
    lengths = sorted({int(n) for row in report["rows"] for n in row["scratch"]})
    text += "\nPer-device scratch (MiB) by sequence length:\n\n"
    text += "| devices | " + " | ".join(f"N={n:,}" for n in lengths) + " |\n"
    text += "| --- |" + " --- |" * len(lengths) + "\n"
    for row in report["rows"]:
        cells = [row["scratch"].get(n, row["scratch"].get(str(n))) for n in lengths]
        text += (
            f"| {row['devices']} | "
            + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
            + " |\n"
        )
    return text


def _figure(report: dict[str, Any], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    devices = [row["devices"] for row in report["rows"]]
    longest = [row["longest"] for row in report["rows"]]
    left.plot(devices, longest, "o-", label="ring")
    left.plot(devices, [longest[0] * d / devices[0] for d in devices], "k--", label="linear")
    left.set(
        xlabel="devices",
        ylabel="longest sequence",
        title=f"fits {report['budget_mib']:g} MiB per device",
    )
    left.set_xscale("log", base=2)
    left.set_yscale("log", base=2)
    for row in report["rows"]:
        lengths = sorted(int(n) for n in row["scratch"])
        values = [row["scratch"].get(n, row["scratch"].get(str(n))) for n in lengths]
        right.plot(lengths, values, "o-", label=f"{row['devices']} devices")
    right.set(xlabel="sequence length", ylabel="per-device scratch (MiB)", title="scratch")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    devices = [int(n) for n in FLAGS.devices]
    bad = [n for n in devices if not 1 <= n <= jax.device_count()]
    if bad:
        raise app.UsageError(f"--devices: {bad} outside 1..{jax.device_count()}")
    report = run(
        devices=devices,
        budget_mib=FLAGS.budget_mib,
        lengths=[int(n) for n in FLAGS.lengths],
        heads=FLAGS.heads,
        head_dim=FLAGS.head_dim,
        causal=FLAGS.causal,
        block=FLAGS.block,
        out_dir=FLAGS.out_dir,
    )
    print(markdown(report))
    print(f"wrote {FLAGS.out_dir}/bench_ring.json, bench_ring.md and bench_ring.png")


if __name__ == "__main__":
    flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Ring sizes.")
    flags.DEFINE_float("budget_mib", 256.0, "Per-device memory budget (MiB).")
    flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768"], "Scratch table lengths.")
    flags.DEFINE_integer("heads", 8, "Attention heads.")
    flags.DEFINE_integer("head_dim", 64, "Head dimension.")
    flags.DEFINE_bool("causal", False, "Causal attention.")
    flags.DEFINE_integer("block", 512, "Ring tile size (block_q = block_k).")
    flags.DEFINE_string("out_dir", "runs/bench_ring", "Output directory.")
    FLAGS = flags.FLAGS
    app.run(main)
