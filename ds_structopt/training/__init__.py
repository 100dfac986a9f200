"""Pieces of the training entry point: LR schedule, checkpoint rotation, logs."""
