"""attn_jax entry point.

Until the experiment launcher (training from ``configs/``) lands, this runs the kernel
demo: every registered attention kernel on a small problem, checked against the float64
reference and timed::

    python launch.py --seq_len=256 --kernels=dot_product,additive
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging

from attn_jax import demo, kernels

_KERNELS = flags.DEFINE_list("kernels", None, "Kernel names to run (default: all registered).")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size of the demo problem.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len", 128, "Sequence length of the demo problem.", lower_bound=1
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # jax's backend-probing INFO lines are noise here
    names = _KERNELS.value or kernels.available()
    unknown = sorted(set(names) - set(kernels.available()))
    if unknown:
        raise app.UsageError(
            f"--kernels: unknown kernel(s) {', '.join(unknown)}; "
            f"available: {', '.join(kernels.available())}"
        )
    rows = demo.run_demo(names, batch=_BATCH.value, seq_len=_SEQ_LEN.value, dtype=_DTYPE.value)
    print(demo.format_table(rows))


if __name__ == "__main__":
    app.run(main)
