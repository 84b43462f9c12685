"""Exceptions the training boundary (train/__main__.py) reports specially, and the exit codes. No torch here."""

EXIT_FRAMEWORK_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, as a process killed by it would report


class TrainingInterrupted(BaseException):
    """SIGTERM arrived; a checkpoint was saved (when the training loop was running) and the job should exit.
    A BaseException, like KeyboardInterrupt: raised from the signal handler anywhere, it must not be
    swallowed by a library's `except Exception` (a download's retry loop, say)."""
