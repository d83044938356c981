"""Tasks' data: generators (deterministic by seed) and step-indexed batching."""
