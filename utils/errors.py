"""Errors that are the user's to fix: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a folder).

    The message names the flag or file and says what to do; it is printed without a traceback.
    """


class DataError(UserError):
    """A data file or folder that cannot be used (missing, empty, malformed, non-finite)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into this run."""
