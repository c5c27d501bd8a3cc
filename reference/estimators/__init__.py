"""Estimators: statistics of a training run computed from what it sees (gradients, batches),
one module per method; stream estimators carry their state from batch to batch."""
