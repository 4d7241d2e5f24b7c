"""The one error type the command lines turn into a one-line message and a non-zero exit."""


class NormfuseError(Exception):
    """A user-facing failure: bad input file, bad flag value, missing optional backend."""

    exit_code = 1


class UsageError(NormfuseError):
    exit_code = 2
