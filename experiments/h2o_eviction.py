"""H2O-style KV-cache eviction on the induction task: what a cache budget costs in accuracy.

Trains a small decoder LM (``flash`` attention, RoPE) on induction heads (recall the symbol
that followed the trigger's earlier occurrence; :func:`attn_jax.data.copy_tasks.
make_induction`), then decodes held-out sequences token by token from the KV cache with
``TransformerOptions.kv_budget``: each sequence keeps its ``--recent`` latest tokens and the
heaviest hitters by accumulated attention mass (``return_attention_mass``), the rest are
evicted (Zhang et al. 2023, "H2O"). Reports accuracy at the last position per budget, against
the same budget spent on the latest tokens only (a sliding window) as the control, and
writes ``h2o.json`` / ``h2o.md`` to ``--out_dir``::

    python experiments/h2o_eviction.py                 # ~3 minutes on 2 CPU cores
    python experiments/h2o_eviction.py --steps=200 --budgets=8,16   # a smoke run
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from attn_jax import decode, models
from attn_jax.data import copy_tasks
from experiments import reporting


def model_options(seq_len: int, **overrides: Any) -> models.TransformerOptions:
    """The LM: 2 attention-only layers of width 64, 4 heads, RoPE, ``flash``."""
    base = dict(
        width=64, num_layers=2, num_heads=4, mlp_dim=0, positions="rope", attention="flash",
        max_len=seq_len,
    )  # fmt: skip
    return models.TransformerOptions(**{**base, **overrides})


def train(config: copy_tasks.InductionConfig, steps: int, batch: int, seed: int = 0):
    """Trains on fresh batches; returns ``(params, final loss)``."""
    model = models.TransformerLM(config.vocab_size, model_options(config.seq_len))
    data = copy_tasks.make_induction(config, steps * batch, seed)
    params = model.init(jax.random.key(seed), jnp.asarray(data["inputs"][:1]))["params"]
    optimizer = optax.adamw(3e-3, weight_decay=0.0)
    state = optimizer.init(params)

    def loss_fn(params, inputs, answers):
        logits = model.apply({"params": params}, inputs)[:, -1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, answers[:, 0]).mean()

    @jax.jit
    def step(params, state, inputs, answers):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, answers)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    loss = jnp.inf
    for i in range(steps):
        rows = slice(i * batch, (i + 1) * batch)
        params, state, loss = step(
            params, state, jnp.asarray(data["inputs"][rows]), jnp.asarray(data["answers"][rows])
        )
    return params, float(loss)


def decoded_accuracy(
    params, config: copy_tasks.InductionConfig, inputs, answers, **options: Any
) -> float:
    """Accuracy at the last position, decoding ``inputs`` one token at a time from the KV
    cache of a model with ``options`` (e.g. ``kv_budget``)."""
    model = models.TransformerLM(config.vocab_size, model_options(config.seq_len, **options))
    cache = decode.init_cache(model, jnp.zeros(inputs.shape, jnp.int32))

    @jax.jit
    def run(cache, inputs):
        def one(cache, token):
            logits, state = model.apply(
                {"params": params, "cache": cache}, token[:, None], decode=True, mutable=["cache"]
            )
            return state["cache"], logits[:, 0]

        _, logits = jax.lax.scan(one, cache, inputs.T)
        return logits[-1].argmax(-1)

    predicted = np.asarray(run(cache, jnp.asarray(inputs)))
    return float((predicted == answers[:, 0]).mean())


def run(
    *,
    seq_len: int,
    steps: int,
    batch: int,
    budgets: list[int],
    recent: int,
    num_eval: int,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Trains, evaluates every budget; writes the outputs and returns the report."""
    config = copy_tasks.InductionConfig(seq_len=seq_len)
    params, loss = train(config, steps, batch)
    held_out = copy_tasks.make_induction(config, num_eval, seed=10_000)
    inputs, answers = held_out["inputs"], held_out["answers"]
    full = decoded_accuracy(params, config, inputs, answers)
    rows = []
    for budget in budgets:
        evaluate = lambda recent, budget=budget: decoded_accuracy(
            params, config, inputs, answers, kv_budget=budget, kv_recent=recent
        )
        # The control: the same budget spent on the latest tokens only (a sliding window).
        rows.append(
            {
                "budget": budget,
                "h2o": evaluate(min(recent, budget)),
                "recent_only": evaluate(budget),
            }
        )
    report = {
        "seq_len": seq_len,
        "steps": steps,
        "batch": batch,
        "final_train_loss": loss,
        "recent": recent,
        "full_cache_accuracy": full,
        "rows": rows,
    }
    reporting.write_outputs(out_dir, "h2o", report, markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# H2O eviction on induction (length {report['seq_len']}, "
        f"{report['steps']} steps of {report['batch']})\n",
        f"Full cache: {100 * report['full_cache_accuracy']:.1f}% "
        f"(train loss {report['final_train_loss']:.3f}).\n",
    ]
    rows = [
        [
            r["budget"],
            f"{100 * r['h2o']:.1f}%",
            f"{100 * r['recent_only']:.1f}%",
        ]
        for r in report["rows"]
    ]
    header = ["cache budget", f"H2O ({report['recent']} recent + heavy hitters)", "latest only"]
    lines.append(reporting.markdown_table(header, rows))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    reporting.start(argv)
    f = flags.FLAGS
    report = run(
        seq_len=f.seq_len,
        steps=f.steps,
        batch=f.batch,
        budgets=[int(b) for b in f.budgets],
        recent=f.recent,
        num_eval=f.num_eval,
        out_dir=f.out_dir,
    )
    print(markdown(report))


if __name__ == "__main__":
    flags.DEFINE_integer("seq_len", 32, "Sequence length (training and evaluation).")
    flags.DEFINE_integer("steps", 1500, "Training steps.")
    flags.DEFINE_integer("batch", 64, "Batch size.")
    flags.DEFINE_list("budgets", ["4", "8", "12", "16", "24"], "KV-cache budgets (tokens).")
    flags.DEFINE_integer("recent", 2, "Latest tokens H2O always keeps.")
    flags.DEFINE_integer("num_eval", 512, "Held-out sequences.")
    flags.DEFINE_string("out_dir", "runs/h2o", "Output directory.")
    app.run(main)
