"""The one exception type the CLI turns into a one-line error message."""


class UserError(Exception):
    """A problem with the user's input (files, options, data, models): shown as one line."""
