"""Config, training loop, checkpoints, metrics and monitoring."""
