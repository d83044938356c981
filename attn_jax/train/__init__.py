"""Training: one loop for every task (pmap, optax, orbax checkpoints, metrics)."""
