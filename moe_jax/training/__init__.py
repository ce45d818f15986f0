"""Training: the optimizer, the train step, checkpoints, metrics and the run loop."""
