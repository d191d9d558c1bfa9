"""User-facing errors: one clear line, exit status 2, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug.

    The message must say what is wrong and how to fix it, in one line.
    """

    exit_code = 2


class RunInterrupted(UserError):
    """SIGINT/SIGTERM during a run: the state was saved; `dynammo resume RUN_DIR` continues it."""

    exit_code = 130
