"""Decoding cost by kernel: cache memory per sequence and time per generated token.

For each kernel (its decode form: a KV cache for dense and blockwise kernels, a rolling
window cache for ``sliding_window``, a recurrent state for ``linear``) and cache length,
a :class:`~attn_jax.models.TransformerLM` decodes one token per sequence with the cache
already holding ``length - 1`` tokens. Reported, in one process:

- cache bytes per sequence (every layer's ``'cache'`` collection);
- the compiled step's scratch memory (``memory_analysis().temp_size_in_bytes``);
- the median time of one decoding step over at least 5 runs after a warm-up (the cases
  take turns, so the machine's load changes hit them alike).

Outputs ``bench_decode.json``, ``bench_decode.md`` and ``bench_decode.png`` in
``--out_dir``::

    python experiments/bench_decode.py --lengths=512,4096
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import decode, models
from experiments import reporting

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a script)."""
    flags.DEFINE_list("kernels", ["dot_product", "flash", "sliding_window", "linear"], "Kernels.")
    flags.DEFINE_list("lengths", ["512", "4096"], "Cache lengths.")
    flags.DEFINE_integer("window", 256, "sliding_window: the window (keys before each query).")
    flags.DEFINE_integer("width", 256, "Model width.")
    flags.DEFINE_integer("layers", 2, "Layers.")
    flags.DEFINE_integer("heads", 8, "Heads.")
    flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
    flags.DEFINE_integer("repeats", 100, "Timed steps (median; >= 5).")
    flags.DEFINE_string("out_dir", "runs/bench_decode", "Output directory.")


def _model(kernel: str, length: int, config: dict[str, Any]) -> models.TransformerLM:
    kwargs = {"local_window_size": (config["window"], 0)} if kernel == "sliding_window" else None
    options = models.TransformerOptions(
        width=config["width"],
        num_layers=config["layers"],
        num_heads=config["heads"],
        max_len=length,
        attention=kernel,
        attention_kwargs=kwargs,
        positions="rope",
    )
    return models.TransformerLM(256, options)


def _filled(cache: Any, count: int) -> Any:
    """The cache as if ``count`` tokens had been decoded (lengths and positions; the cached
    values stay zeros, which costs the same to attend to)."""

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "cache_lengths" in name or name.endswith("['position']"):
            return jnp.full_like(x, count)
        return x

    return jax.tree_util.tree_map_with_path(fill, cache)


def prepare(kernel: str, length: int, config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """One kernel at one cache length: its row (without the time) and a function that runs
    one compiled decoding step."""
    model = _model(kernel, length, config)
    batch = config["batch"]
    tokens = jnp.zeros((batch, length), jnp.int32)
    params = jax.jit(lambda: model.init(jax.random.key(0), tokens[:, :8]))()["params"]
    cache = _filled(decode.init_cache(model, tokens), length - 1)
    per_sequence = sum(x.nbytes for x in jax.tree.leaves(cache)) // batch

    def step(cache, token):
        logits, state = model.apply(
            {"params": params, "cache": cache}, token, decode=True, mutable=["cache"]
        )
        return logits, state["cache"]

    token = jnp.ones((batch, 1), jnp.int32)
    compiled = jax.jit(step).lower(cache, token).compile()
    run = lambda: jax.block_until_ready(compiled(cache, token))
    run()  # warm-up
    row = {
        "kernel": kernel,
        "length": length,
        "cache_bytes_per_sequence": int(per_sequence),
        "scratch_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }
    return row, run


def measure(cases: list[tuple[str, int]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for every ``(kernel, length)``; the steps are timed in turn, one of each per
    round, so a change in the machine's load hits every case alike."""
    prepared = [prepare(kernel, length, config) for kernel, length in cases]
    times: list[list[float]] = [[] for _ in prepared]
    for _ in range(config["repeats"]):
        for (_, run), mine in zip(prepared, times, strict=True):
            start = time.perf_counter()
            run()
            mine.append(time.perf_counter() - start)
    return [
        {**row, "ms_per_token": 1e3 * statistics.median(mine)}
        for (row, _), mine in zip(prepared, times, strict=True)
    ]


def markdown(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [
        f"Width {config['width']}, {config['layers']} layers, {config['heads']} heads, batch "
        f"{config['batch']}; sliding window {config['window']}; {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}.",
        "",
        "| kernel | cache length | cache MiB / sequence | step scratch MiB | ms / token |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['kernel']}` | {r['length']:,} | {r['cache_bytes_per_sequence'] / 2**20:.3f} "
            f"| {r['scratch_bytes'] / 2**20:.2f} | {r['ms_per_token']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        lengths = [r["length"] for r in mine]
        axes[0].plot(
            lengths, [r["cache_bytes_per_sequence"] / 2**20 for r in mine], "o-", label=kernel
        )
        axes[1].plot(lengths, [r["ms_per_token"] for r in mine], "o-", label=kernel)
    for ax, label in zip(axes, ("cache MiB per sequence", "ms per token"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="cache length", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    reporting.start(argv)
    if FLAGS.repeats < 5:
        raise app.UsageError(f"--repeats: at least 5, got {FLAGS.repeats}")
    try:
        lengths = [int(n) for n in FLAGS.lengths]
    except ValueError:
        raise app.UsageError(f"--lengths: expected integers, got {FLAGS.lengths}") from None
    config = {
        k: getattr(FLAGS, k) for k in ("window", "width", "layers", "heads", "batch", "repeats")
    }
    rows = measure([(kernel, length) for kernel in FLAGS.kernels for length in lengths], config)
    for row in rows:
        print(row)
    out_dir = pathlib.Path(FLAGS.out_dir)
    reporting.write_outputs(out_dir, "bench_decode", {"config": config, "rows": rows},
                            markdown(rows, config))  # fmt: skip
    plot(rows, out_dir / "bench_decode.png")
    print(f"wrote {out_dir}/bench_decode.json, bench_decode.md, bench_decode.png")


if __name__ == "__main__":
    define_flags()
    app.run(main)
