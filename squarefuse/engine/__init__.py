"""Training and evaluation infrastructure: trainer, evaluator, checkpoints, distributed, logging."""
