"""Training: the loop, its schedule, loss, batching and checkpoints."""
