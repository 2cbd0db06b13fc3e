"""Resumable training checkpoints: the checkpoint folders, trainer state (optimizer, schedule, RNG, loss
scale), resume compatibility, and the ownership and lock of a run's output folder."""
