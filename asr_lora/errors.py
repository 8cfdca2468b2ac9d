"""The base of every error that is the user's to fix (bad input, missing files, wrong config).

The CLI prints these as one clear line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """An error caused by input, configuration or environment, with a message naming what to fix."""


class DataError(UserError, FileNotFoundError):
    """A corpus or manifest is missing or is not what it claims to be."""


class TrainingError(UserError):
    """Training cannot go on (non-finite losses, too many bad rows, a failed checkpoint write)."""
