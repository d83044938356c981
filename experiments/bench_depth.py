"""Depth that scales: compile time and memory of a training step, unrolled vs scanned layers,
with and without rematerialisation (``TransformerOptions(scan_layers=..., remat=...)``).

For each variant (``LAYOUT`` or ``LAYOUT+POLICY``: ``unrolled`` / ``scan`` layers, a
:data:`~attn_jax.models.layer_stack.REMAT_POLICIES` name) and depth, a
:class:`~attn_jax.models.TransformerLM` training step (forward, backward and an SGD update
of next-token cross-entropy) is lowered and compiled with ``jax.jit``. Reported:

- ``lower_s`` / ``compile_s``: wall time of ``jit(step).lower(...)`` (tracing) and of
  ``.compile()``;
- from ``compiled.memory_analysis()``: ``temp_bytes`` (activations kept for the backward
  pass and scratch), ``argument_bytes`` (parameters and the batch), ``output_bytes``;
- ``step_ms``: the median time of ``--repeats`` compiled steps (0: not run).

Outputs ``bench_depth.json`` and ``bench_depth.md`` in ``--out_dir``::

    python experiments/bench_depth.py --layers=2,12
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import models
from attn_jax.models.layer_stack import REMAT_POLICIES
from experiments import reporting

FLAGS = flags.FLAGS
LAYOUTS = {"unrolled": False, "scan": True}
DEFAULT_VARIANTS = ["unrolled", "scan", "scan+full", "scan+dots", "unrolled+full"]


def define_flags() -> None:
    """The command-line flags (defined only when run as a script)."""
    flags.DEFINE_list("variants", DEFAULT_VARIANTS, "LAYOUT or LAYOUT+REMAT_POLICY.")
    flags.DEFINE_list("layers", ["2", "12"], "Depths.")
    flags.DEFINE_integer("width", 256, "Model width.")
    flags.DEFINE_integer("heads", 4, "Heads.")
    flags.DEFINE_integer("mlp_dim", 1024, "MLP hidden features.")
    flags.DEFINE_integer("vocab", 4096, "Vocabulary.")
    flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
    flags.DEFINE_integer("batch", 4, "Sequences per step.")
    flags.DEFINE_string("attention", "dot_product", "Attention kernel (registry name).")
    flags.DEFINE_integer("repeats", 5, "Timed steps per case (median; 0: compile only).")
    flags.DEFINE_string("out_dir", "runs/bench_depth", "Output directory.")


def parse_variant(name: str) -> tuple[bool, str]:
    """``"scan+full"`` -> ``(scan_layers=True, remat="full")``; ``"unrolled"`` -> no remat."""
    layout, _, policy = name.partition("+")
    policy = policy or "none"
    if layout not in LAYOUTS or policy not in REMAT_POLICIES:
        raise ValueError(
            f"--variants: {name!r} is not LAYOUT[+POLICY] with LAYOUT in {tuple(LAYOUTS)} and "
            f"POLICY in {tuple(REMAT_POLICIES)}"
        )
    return LAYOUTS[layout], policy


def train_step_fn(model: models.TransformerLM, learning_rate: float = 1e-3):
    """``step(params, tokens [batch, seq_len + 1]) -> (params, loss)``: next-token
    cross-entropy, its gradient and an SGD update."""

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()

    def step(params, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return params, loss

    return step


def measure(variant: str, layers: int, config: dict[str, Any]) -> dict[str, Any]:
    """One variant at one depth: compile times, memory and (``repeats > 0``) step time."""
    scan, remat = parse_variant(variant)
    options = models.TransformerOptions(
        width=config["width"],
        num_layers=layers,
        num_heads=config["heads"],
        mlp_dim=config["mlp_dim"],
        max_len=config["seq_len"],
        attention=config["attention"],
        positions="rope",
        scan_layers=scan,
        remat=remat,
    )
    model = models.TransformerLM(config["vocab"], options)
    tokens = jnp.zeros((config["batch"], config["seq_len"] + 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1])["params"]
    start = time.perf_counter()
    lowered = jax.jit(train_step_fn(model)).lower(shapes, tokens)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    row = {
        "variant": variant,
        "layers": layers,
        "scan_layers": scan,
        "remat": remat,
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "step_ms": 0.0,
    }
    if config["repeats"]:
        # Small constant weights: the cost of a dense step does not depend on the values.
        params = jax.tree.map(lambda s: jnp.full(s.shape, 0.02, s.dtype), shapes)
        times = []
        for _ in range(config["repeats"]):
            begin = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens))
            times.append(time.perf_counter() - begin)
        row["step_ms"] = 1e3 * statistics.median(times)
    return row


def markdown(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """One line per variant, the depths side by side."""
    depths = sorted({r["layers"] for r in rows})
    by_case = {(r["variant"], r["layers"]): r for r in rows}
    header = ["variant"]
    for d in depths:
        header += [f"compile s ({d} L)", f"temp MiB ({d} L)"]
    for d in depths:
        header += [f"args MiB ({d} L)", f"step ms ({d} L)"]
    table = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = [f"`{variant}`"]
        mine = [by_case[variant, d] for d in depths]
        for r in mine:
            cells += [f"{r['lower_s'] + r['compile_s']:.1f}", f"{r['temp_bytes'] / 2**20:.0f}"]
        for r in mine:
            step = f"{r['step_ms']:.0f}" if r["step_ms"] else "-"
            cells += [f"{r['argument_bytes'] / 2**20:.0f}", step]
        table.append(cells)
    intro = (
        f"TransformerLM training step (forward, backward, SGD): width {config['width']}, "
        f"{config['heads']} heads, MLP {config['mlp_dim']}, vocabulary {config['vocab']}, "
        f"batch {config['batch']} x {config['seq_len']} tokens, `{config['attention']}`; "
        f"compile s = lower + compile wall time; temp = `memory_analysis().temp_size_in_bytes`; "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}.\n\n"
    )
    return intro + reporting.markdown_table(header, table)


def main(argv: list[str]) -> None:
    reporting.start(argv)
    depths = reporting.positive_ints(FLAGS.layers, "layers", allow_empty=False)
    try:
        for variant in FLAGS.variants:
            parse_variant(variant)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    if FLAGS.repeats < 0:
        raise app.UsageError(f"--repeats: expected >= 0, got {FLAGS.repeats}")
    keys = ("width", "heads", "mlp_dim", "vocab", "seq_len", "batch", "attention", "repeats")
    config = {k: getattr(FLAGS, k) for k in keys}
    rows = []
    for variant in FLAGS.variants:
        for layers in depths:
            rows.append(measure(variant, layers, config))
            print(rows[-1], flush=True)
    out_dir = pathlib.Path(FLAGS.out_dir)
    reporting.write_outputs(out_dir, "bench_depth", {"config": config, "rows": rows},
                            markdown(rows, config))  # fmt: skip
    print(f"wrote {out_dir}/bench_depth.json, bench_depth.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
