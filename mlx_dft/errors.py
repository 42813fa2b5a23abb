"""The exception types the CLI turns into a one-line error message."""


class UserError(Exception):
    """A problem with the user's input (files, options, data, models): shown as one line."""


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C); the message says how to continue it (exit status 130)."""
