"""User-facing errors: one clear line, exit status 2, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug.

    The message must say what is wrong and how to fix it, in one line.
    """

    exit_code = 2

    def __init__(self, message: str = "", *args):
        # one line whatever a value quoted in it holds (a name with a newline, a pasted path)
        super().__init__(" ".join(str(message).splitlines()), *args)


class RunInterrupted(UserError):
    """SIGINT/SIGTERM during a run: the state was saved; `dynammo resume RUN_DIR` continues it."""

    exit_code = 130


_ALLOCATION_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def is_allocation_failure(exc: BaseException) -> bool:
    """True for a failed allocation (MemoryError, torch's CPU allocator, CUDA out of memory): a
    resource the config asked too much of, not a bug."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(
        m in str(exc).lower() for m in _ALLOCATION_MESSAGES)
