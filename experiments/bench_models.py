"""Whole-model speed and memory: training and decoding a TransformerLM, against the same
model built on flax's attention, every contender in one process.

Training: tokens per second of one train step (forward, backward and an AdamW update;
``--tokens_per_step`` tokens as ``tokens_per_step // N`` sequences of ``N``) of a
:class:`~attn_jax.models.TransformerLM` with each kernel of ``--kernels`` (``auto``, the
models' default, picks per shape) and of :class:`experiments.flax_lm.FlaxLM`, the same
architecture on ``flax.linen.MultiHeadDotProductAttention`` (``flax``); the compiled
step's memory from ``memory_analysis()`` (``temp``: activations and scratch; ``peak``:
temp plus arguments and outputs, less what is donated).

Decoding (``--decode_kernels``, default ``auto``, against flax's own ``decode=True``
cache): prefill of a ``--prompt``-token prompt into a ``--cache``-slot cache (ours: one
call; flax: one token per call, the whole prompt as one compiled ``lax.scan``), then the
latency of one decoding step with the cache holding the prompt, at each ``--decode_batches``.

Times are medians over ``--repeats`` runs after a warm-up, the contenders taking turns
(so a change in the machine's load hits them alike). Outputs ``bench_models.json``,
``bench_models.md`` and ``bench_models.png`` in ``--out_dir``::

    python experiments/bench_models.py                      # about 15 minutes on 2 cores
    python experiments/bench_models.py --seq_lens=512 --skip_decode
"""

from __future__ import annotations

import datetime
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from attn_jax import decode, kernels, models
from experiments import reporting
from experiments.bench_kernels import take_turns
from experiments.flax_lm import FlaxLM

FLAGS = flags.FLAGS
FLAX = "flax"


def define_flags() -> None:
    """The command-line flags (defined only when run as a script)."""
    flags.DEFINE_list("kernels", ["auto", "dot_product", "flash"], "Our kernels (training).")
    flags.DEFINE_list("seq_lens", ["512", "2048", "8192"], "Training sequence lengths.")
    flags.DEFINE_integer("tokens_per_step", 8192, "Tokens per train step.")
    flags.DEFINE_integer("width", 256, "Model width.")
    flags.DEFINE_integer("layers", 4, "Layers.")
    flags.DEFINE_integer("heads", 4, "Heads.")
    flags.DEFINE_integer("mlp_dim", 1024, "MLP hidden features.")
    flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
    flags.DEFINE_integer("repeats", 5, "Timed train steps per contender (median; >= 5).")
    flags.DEFINE_bool("skip_decode", False, "Only the training benchmark.")
    flags.DEFINE_list("decode_kernels", ["auto"], "Our kernels (decoding).")
    flags.DEFINE_integer("prompt", 1024, "Prompt tokens (prefill).")
    flags.DEFINE_integer("cache", 2048, "Cache slots.")
    flags.DEFINE_list("decode_batches", ["1", "8"], "Sequences decoded together.")
    flags.DEFINE_integer("decode_repeats", 50, "Timed decoding steps (median; >= 5).")
    flags.DEFINE_string("out_dir", "runs/bench_models", "Output directory.")


# ----------------------------------------------------------------------------- models


def build(contender: str, config: dict[str, Any], max_len: int, decode_mode: bool = False):
    """``TransformerLM`` with kernel ``contender``, or the flax peer (``"flax"``)."""
    if contender == FLAX:
        return FlaxLM(
            config["vocab"],
            config["width"],
            config["layers"],
            config["heads"],
            config["mlp_dim"],
            max_len,
            decode=decode_mode,
        )
    options = models.TransformerOptions(
        width=config["width"],
        num_layers=config["layers"],
        num_heads=config["heads"],
        mlp_dim=config["mlp_dim"],
        attention=contender,
        positions="learned",
        max_len=max_len,
    )
    return models.TransformerLM(config["vocab"], options)


def init_params(model, tokens: jax.Array) -> Any:
    return jax.jit(model.init)(jax.random.key(0), tokens)["params"]


def memory(compiled) -> dict[str, int]:
    """``temp`` and ``peak`` bytes of a compiled program."""
    m = compiled.memory_analysis()
    peak = (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak)}


# ----------------------------------------------------------------------------- training


def train_case(contender: str, length: int, config: dict[str, Any]):
    """One contender at one length: its row (without the time) and a function running one
    compiled train step (the state carried from step to step)."""
    batch = max(1, config["tokens_per_step"] // length)
    model = build(contender, config, max_len=length)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, config["vocab"])
    params = init_params(model, tokens[:, :8])
    tx = optax.adamw(1e-3)

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, tx.init(params)]
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, tokens).compile()
    compile_s = time.perf_counter() - start

    def run():
        state[0], state[1], loss = compiled(*state, tokens)
        return jax.block_until_ready(loss)

    run()  # warm-up
    row = {
        "contender": contender,
        "length": length,
        "batch": batch,
        "parameters": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": compile_s,
        **memory(compiled),
    }
    return row, run


def measure_training(contenders: list[str], lengths: list[int], config: dict[str, Any]):
    """Rows of every contender at every length; the contenders of one length take turns."""
    rows = []
    for length in lengths:
        cases = [train_case(c, length, config) for c in contenders]
        seconds = take_turns([run for _, run in cases], config["repeats"])
        for (row, _), s in zip(cases, seconds, strict=True):
            tokens = row["batch"] * length
            rows.append({**row, "step_s": s, "tokens_per_s": tokens / s})
            print(_train_line(rows[-1]), flush=True)
        del cases
    return rows


def _train_line(r: dict[str, Any]) -> str:
    return (
        f"train {r['contender']:>12} N={r['length']:<6} {r['tokens_per_s']:9.0f} tokens/s "
        f"temp {r['temp_bytes'] / 2**20:8.1f} MiB peak {r['peak_bytes'] / 2**20:8.1f} MiB"
    )


# ----------------------------------------------------------------------------- decoding


def decode_cases(contender: str, batch: int, config: dict[str, Any]):
    """Prefill and one-step runs of a contender at ``batch``: ``(row, prefill, step)``."""
    prompt_len, slots = config["prompt"], config["cache"]
    prompt = jax.random.randint(jax.random.key(2), (batch, prompt_len), 0, config["vocab"])
    token = jnp.ones((batch, 1), jnp.int32)
    full = jnp.zeros((batch, slots), jnp.int32)
    if contender == FLAX:
        model = build(FLAX, config, max_len=slots, decode_mode=True)
        variables = jax.jit(model.init)(jax.random.key(0), full)
        params = variables["params"]
        empty = jax.tree.map(jnp.zeros_like, variables["cache"])

        def one(cache, tok):
            logits, state = model.apply({"params": params, "cache": cache}, tok, mutable=["cache"])
            return logits, state["cache"]

        def prefill(cache, prompt):
            def body(cache, tok):
                logits, cache = one(cache, tok[:, None])
                return cache, logits[:, -1]

            cache, logits = jax.lax.scan(body, cache, prompt.T)
            return logits[-1], cache
    else:
        model = build(contender, config, max_len=slots)
        params = init_params(model, prompt[:, :8])
        empty = decode.init_cache(model, full)

        def one(cache, tok):
            logits, state = model.apply(
                {"params": params, "cache": cache}, tok, decode=True, mutable=["cache"]
            )
            return logits, state["cache"]

        def prefill(cache, prompt):
            logits, cache = one(cache, prompt)
            return logits[:, -1], cache

    prefill_c = jax.jit(prefill).lower(empty, prompt).compile()
    _, filled = jax.block_until_ready(prefill_c(empty, prompt))
    step_c = jax.jit(one).lower(filled, token).compile()
    jax.block_until_ready(step_c(filled, token))
    row = {
        "contender": contender,
        "batch": batch,
        "prompt": prompt_len,
        "cache": slots,
        "step_temp_bytes": memory(step_c)["temp_bytes"],
    }
    return (
        row,
        lambda: jax.block_until_ready(prefill_c(empty, prompt)),
        lambda: jax.block_until_ready(step_c(filled, token)),
    )


def measure_decoding(contenders: list[str], batches: list[int], config: dict[str, Any]):
    rows = []
    for batch in batches:
        cases = [decode_cases(c, batch, config) for c in contenders]
        prefill_s = take_turns([c[1] for c in cases], max(5, config["repeats"]))
        step_s = take_turns([c[2] for c in cases], config["decode_repeats"])
        for (row, _, _), p, s in zip(cases, prefill_s, step_s, strict=True):
            rows.append(
                {
                    **row,
                    "prefill_s": p,
                    "ms_per_token": 1e3 * s,
                    "tokens_per_s": batch / s,
                }
            )
            r = rows[-1]
            print(
                f"decode {r['contender']:>12} batch={batch:<3} prefill {r['prefill_s']:.3f} s "
                f"step {r['ms_per_token']:.2f} ms ({r['tokens_per_s']:.0f} tokens/s)",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- report


def ratios(rows: list[dict[str, Any]], key: str, group: str) -> dict[tuple, float]:
    """``(contender, group value) -> row[key] / flax's row[key]`` of the same group."""
    flax = {r[group]: r[key] for r in rows if r["contender"] == FLAX}
    return {
        (r["contender"], r[group]): r[key] / flax[r[group]]
        for r in rows
        if r["contender"] != FLAX and r[group] in flax
    }


def markdown(train: list[dict], dec: list[dict], config: dict[str, Any]) -> str:
    head = (
        f"TransformerLM: width {config['width']}, {config['layers']} layers, "
        f"{config['heads']} heads, MLP {config['mlp_dim']}, vocabulary {config['vocab']}, "
        f"float32; {config['tokens_per_step']:,} tokens per train step (AdamW). "
        f"{config['machine']}, jax {jax.__version__}, {config['date']}.\n"
    )
    parts = [head]
    if train:
        speed = ratios(train, "tokens_per_s", "length")
        mem = ratios(train, "peak_bytes", "length")
        rows = [
            [
                f"`{r['contender']}`",
                f"{r['length']:,} x {r['batch']}",
                f"{r['tokens_per_s']:,.0f}",
                "1" if r["contender"] == FLAX else f"{speed[r['contender'], r['length']]:.2f}x",
                f"{r['temp_bytes'] / 2**20:,.0f}",
                f"{r['peak_bytes'] / 2**20:,.0f}",
                "1" if r["contender"] == FLAX else f"{mem[r['contender'], r['length']]:.2f}x",
                f"{r['compile_s']:.1f}",
            ]
            for r in train
        ]
        header = ["model", "N x batch", "tokens/s", "vs flax", "temp MiB", "peak MiB",
                  "peak vs flax", "compile s"]  # fmt: skip
        parts += ["\nTraining:\n", reporting.markdown_table(header, rows)]
    if dec:
        latency = ratios(dec, "ms_per_token", "batch")
        prefill = ratios(dec, "prefill_s", "batch")
        rows = [
            [
                f"`{r['contender']}`",
                r["batch"],
                f"{r['prefill_s'] * 1e3:,.1f}",
                "1"
                if r["contender"] == FLAX
                else f"{1 / prefill[r['contender'], r['batch']]:.1f}x",
                f"{r['ms_per_token']:.2f}",
                "1" if r["contender"] == FLAX else f"{latency[r['contender'], r['batch']]:.2f}",
                f"{r['tokens_per_s']:,.0f}",
            ]
            for r in dec
        ]
        header = ["model", "batch", f"prefill {config['prompt']} tokens ms", "prefill speed-up",
                  "ms / token", "latency vs flax", "tokens/s"]  # fmt: skip
        parts += [
            f"\nDecoding, {config['cache']:,}-slot cache holding the {config['prompt']:,}-token "
            "prompt (flax: its `decode=True` cache, one token per call):\n",
            reporting.markdown_table(header, rows),
        ]
    return "".join(parts)


def plot(train: list[dict], dec: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for contender in dict.fromkeys(r["contender"] for r in train):
        mine = [r for r in train if r["contender"] == contender]
        lengths = [r["length"] for r in mine]
        axes[0].plot(lengths, [r["tokens_per_s"] for r in mine], "o-", label=contender)
        axes[1].plot(lengths, [r["peak_bytes"] / 2**20 for r in mine], "o-", label=contender)
    axes[0].set(xscale="log", xlabel="sequence length", ylabel="train tokens/s")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak MiB")
    contenders = list(dict.fromkeys(r["contender"] for r in dec))
    batches = list(dict.fromkeys(r["batch"] for r in dec))
    width = 0.8 / max(1, len(contenders))
    for i, contender in enumerate(contenders):
        values = [
            next(r["ms_per_token"] for r in dec if r["contender"] == contender and r["batch"] == b)
            for b in batches
        ]
        axes[2].bar([j + i * width for j in range(len(batches))], values, width, label=contender)
    axes[2].set(
        xticks=[j + 0.4 - width / 2 for j in range(len(batches))],
        xticklabels=[f"batch {b}" for b in batches],
        ylabel="ms per decoded token",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    reporting.save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str]) -> None:
    known = [k for k in kernels.available(interface="dot_product")]
    reporting.start(
        argv, kernels=(FLAGS.kernels, known), decode_kernels=(FLAGS.decode_kernels, known)
    )
    for flag in ("repeats", "decode_repeats"):
        if getattr(FLAGS, flag) < 5:
            raise app.UsageError(f"--{flag}: at least 5, got {getattr(FLAGS, flag)}")
    lengths = reporting.positive_ints(FLAGS.seq_lens, "seq_lens", allow_empty=False)
    batches = reporting.positive_ints(FLAGS.decode_batches, "decode_batches", allow_empty=False)
    if FLAGS.prompt >= FLAGS.cache:
        raise app.UsageError(f"--prompt ({FLAGS.prompt}) must be below --cache ({FLAGS.cache})")
    config = {
        k: getattr(FLAGS, k)
        for k in (
            "tokens_per_step",
            "width",
            "layers",
            "heads",
            "mlp_dim",
            "vocab",
            "repeats",
            "prompt",
            "cache",
            "decode_repeats",
        )
    }
    config["machine"] = (
        f"{jax.devices()[0].device_kind} ({platform.machine()}, {jax.device_count()} device)"
    )
    config["date"] = datetime.date.today().isoformat()
    train = measure_training([*FLAGS.kernels, FLAX], lengths, config)
    dec = (
        []
        if FLAGS.skip_decode
        else measure_decoding([*FLAGS.decode_kernels, FLAX], batches, config)
    )
    out_dir = pathlib.Path(FLAGS.out_dir)
    md = markdown(train, dec, config)
    reporting.write_outputs(
        out_dir, "bench_models", {"config": config, "train": train, "decode": dec}, md
    )
    plot(train, dec, out_dir / "bench_models.png")
    print(md)
    print(f"wrote {out_dir}/bench_models.json, bench_models.md, bench_models.png")


if __name__ == "__main__":
    define_flags()
    app.run(main)
