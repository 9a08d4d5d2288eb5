"""Training: the loop and its config, the multi-head objective, optimizer and schedule,
checkpoints, distributed wrapping, evaluation and draft-head distillation."""
