"""Training: the loop (trainer), flow matching, optimizers, checkpoints, logging."""
