"""Scripts that reproduce attn_jax's tables: benchmarks and accuracy against published
results (``python experiments/NAME.py --help``); installed with attn_jax, so they run, and
import each other, from any directory."""
