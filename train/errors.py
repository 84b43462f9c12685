"""Exceptions the training boundary (train/__main__.py) reports specially. No torch here."""


class TrainingInterrupted(Exception):
    """SIGTERM arrived; a checkpoint was saved (if any step had run) and the job should exit."""
