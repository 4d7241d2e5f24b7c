"""The one error type the command lines turn into a one-line message and a non-zero exit."""
import re


class NormfuseError(Exception):
    """A user-facing failure: bad input file, bad flag value, missing optional backend."""

    exit_code = 1


class UsageError(NormfuseError):
    exit_code = 2


class RunFailure(NormfuseError):
    """A model failed while running on the inputs it was given (a shape it cannot take, an index past
    a table). Where normfuse made those inputs up, `export.dims.hint_on_failure` adds what to suspect."""


class IndexOutsideTable(RunFailure):
    """A run failed on an index input holding a value past the table it indexes (a token id outside
    the vocabulary): the message names the input and the value, so no shape is to be suspected."""


class MissingKernel(RunFailure):
    """ONNX Runtime's provider has no kernel for one of the model's ops at the types it is given
    (ScatterND adding float16 on the CPU): the model, not the inputs' shapes, is what it cannot run.
    `kernel` is ONNX Runtime's own line about it."""

    def __init__(self, path, said: str):
        """`said`: ONNX Runtime's message, at load or at run."""
        self.kernel = said.split("Status Message: ")[-1].split(" : ")[-1].rstrip(".")  # without its status codes
        super().__init__(f"{path}: ONNX Runtime has no kernel for it: {said.rstrip('.')}; onnx's reference "
                         "evaluator runs every op: python -m export.validate REFERENCE FUSED --backend onnx-reference")


# ONNX Runtime's words for a kernel it lacks: at load, and at run where one kernel serves some types only
MISSING_KERNEL_SIGNS = ("Could not find an implementation for", "data type is not supported with")


def missing_kernel(message: str) -> bool:
    """Whether ONNX Runtime's `message` says it has no kernel for an op at these types."""
    return any(sign in message for sign in MISSING_KERNEL_SIGNS)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, cut at `limit` characters (onnx's evaluator may list
    every tensor it knows), or its class name when it says nothing: for one-line errors. ONNX
    Runtime's source file and function, which its messages name before the reason, are left out:
    they would take most of the line and cut the reason off."""
    text = ORT_SOURCE.sub("", str(exc))
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    return lines[0] if len(lines[0]) <= limit else lines[0][:limit] + " ..."


# "/onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:33
# onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, ...) "
ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[\w:~<>]+\([^()]*\)(?: const)? )?")
