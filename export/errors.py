"""The one error type the command lines turn into a one-line message and a non-zero exit."""


class NormfuseError(Exception):
    """A user-facing failure: bad input file, bad flag value, missing optional backend."""

    exit_code = 1


class UsageError(NormfuseError):
    exit_code = 2


class RunFailure(NormfuseError):
    """A model failed while running on the inputs it was given (a shape it cannot take, an index past
    a table). Where normfuse made those inputs up, `export.dims.hint_on_failure` adds what to suspect."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, cut at `limit` characters (onnx's evaluator may list
    every tensor it knows), or its class name when it says nothing: for one-line errors."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    return lines[0] if len(lines[0]) <= limit else lines[0][:limit] + " ..."
