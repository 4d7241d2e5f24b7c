"""Serving: load a built model, `.onnx` or TensorRT `.plan`, behind one interface.

    from export.runtime import load
    model = load("build/small-rmsnorm/fused.onnx")        # ONNX Runtime, providers from what is present
    model = load("build/small-rmsnorm/fused.plan")        # TensorRT runtime (the plugins are in the engine)
    outputs = model.run({"hidden_states": x})             # numpy in -> numpy out; torch in -> torch out

- Inputs are checked against the model's signature first (names, dtype, rank, fixed dims; for
  TensorRT also one size for axes of one name); a mismatch is a NormfuseError naming the input. A run that
  fails on a token id past its embedding table says so, naming the input.
- Device buffers are kept between calls and reused while the shapes stay the same.
- `OrtModel.run_keeping(feeds, keep)` leaves chosen outputs where ONNX Runtime wrote them, to be
  fed back as inputs (a KV cache between decode steps) without a trip through the host.
- `cuda_graph=True` (TensorRT) captures the engine's launch in a CUDA graph the first time a shape
  is seen and replays it on later calls with that shape.
- Thread safety: `run` may be called from several threads. ONNX Runtime runs one session's calls
  side by side on the CPU provider, and `run_keeping`'s anywhere (each has a binding of its own);
  on the CUDA provider `run` reuses one device binding, and a TensorRT model one execution context,
  so their calls are serialised by a lock. For parallel execution there, load one model per
  thread, or scale out with a Triton model repository (`python -m export.build ... --triton-repo DIR`).
"""
from __future__ import annotations

import io
import threading
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from normops import numpy_dtype

from .errors import IndexOutsideTable, MissingKernel, NormfuseError, RunFailure, first_line, missing_kernel
from .files import require_file

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")

# contract dtype names -> ONNX element types (what I/O binding takes for types numpy lacks)
ONNX_ELEMENT_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
                      "float64": 11, "bfloat16": 16}

# ONNX Runtime's type strings -> contract dtype names
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype name, shape (None for a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    dim_params: tuple[str | None, ...] = ()  # names of dynamic axes, where the model gives them (export.dims)
    rank_known: bool = True  # False: the model gives no shape at all, so any rank is taken

    def describe(self) -> str:
        if not self.rank_known:
            return f"{self.dtype}[any shape]"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


def signature(kind: str, path: Path, where: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    """What a loaded model is, for repr(): `OrtModel(m.onnx on CPUExecutionProvider: x float32[?, 64] -> y ...)`."""
    def listed(specs):
        return ", ".join(f"{s.name} {s.describe()}" for s in specs)
    return f"{kind}({path} on {where}: {listed(inputs)} -> {listed(outputs)})"


def dtype_name(dtype: Any) -> str:
    """Contract dtype name of a numpy dtype or a torch dtype."""
    text = str(dtype)
    if text.startswith("torch."):
        text = text[len("torch."):]
    return {"float": "float32", "half": "float16", "double": "float64"}.get(text, text)


def is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def to_numpy(value: Any) -> np.ndarray:
    """numpy view/copy of a numpy array or a torch tensor (bfloat16 through its bit pattern)."""
    if not is_torch(value):
        return np.asarray(value)
    import torch

    tensor = value.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return tensor.numpy()


def to_torch(array: np.ndarray, device: Any = "cpu") -> Any:
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == numpy_dtype("bfloat16"):
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to(device)


def is_ortvalue(value: Any) -> bool:
    return type(value).__name__ == "OrtValue" and type(value).__module__.startswith("onnxruntime")


def value_shape(value: Any) -> tuple[int, ...]:
    """Shape of a numpy array, a torch tensor or an OrtValue (whose shape is a method)."""
    return tuple(int(d) for d in (value.shape() if is_ortvalue(value) else value.shape))


def value_dtype(value: Any) -> str:
    """Contract dtype name of a numpy array, a torch tensor or an OrtValue; else the type's name."""
    if is_ortvalue(value):
        return _ORT_TYPES.get(value.data_type(), value.data_type())
    return dtype_name(value.dtype) if hasattr(value, "dtype") else type(value).__name__


def check_feeds(inputs: list[TensorSpec], feeds: dict, where: str = "model", allow_empty: bool = False) -> None:
    """Raise a one-line NormfuseError naming the first input that does not fit the signature.
    `allow_empty`: a zero-length axis is fine (ONNX Runtime takes one, and a KV cache is empty
    before the prompt); TensorRT's profiles start at 1."""
    if not isinstance(feeds, dict):
        raise NormfuseError(f"{where}: inputs must be a dict of name -> array, got {type(feeds).__name__}")
    expected = {spec.name: spec for spec in inputs}
    for name in feeds:
        if name not in expected:
            raise NormfuseError(f"{where}: input {name!r} is not an input of the model "
                                f"(it takes {', '.join(f'{n} {s.describe()}' for n, s in expected.items())})")
    for name, spec in expected.items():
        if name not in feeds:
            raise NormfuseError(f"{where}: input {name!r} {spec.describe()} is missing")
        value = feeds[name]
        got = value_dtype(value)
        if got != spec.dtype:
            raise NormfuseError(f"{where}: input {name!r} has dtype {got}, the model takes {spec.describe()}")
        if not spec.rank_known:
            continue
        shape = value_shape(value)
        if len(shape) != len(spec.shape):
            raise NormfuseError(f"{where}: input {name!r} has rank {len(shape)} (shape {list(shape)}), "
                                f"the model takes rank {len(spec.shape)}: {spec.describe()}")
        for axis, (have, want) in enumerate(zip(shape, spec.shape)):
            if want is not None and have != want:
                raise NormfuseError(f"{where}: input {name!r} has {have} on axis {axis} (shape {list(shape)}), "
                                    f"the model takes {spec.describe()}")
            if have == 0 and not allow_empty:
                raise NormfuseError(f"{where}: input {name!r} is empty on axis {axis} (shape {list(shape)})")


def check_named_dims_agree(inputs: list[TensorSpec], feeds: dict, where: str) -> None:
    """Two inputs' axes of the same name have one size, for feeds `check_feeds` passed: ONNX means
    that by a shared dim_param, and TensorRT's parser makes it a constraint its engine checks at
    run time. Not asked of ONNX Runtime, which runs such inputs: torch's dynamo exporter gives
    every axis named "sequence" in its dynamic shapes that name, each still free of the others (an
    encoder-decoder's input and decoder ids). Only plain names: a name like 'past + seq' is
    normfuse's reading (export.dims), not ONNX's, and exporters feed such axes other lengths on
    purpose. An empty axis is a placeholder and is not held to the name either: a merged decoder's
    first step takes its cache empty, the encoder's part too, whatever the encoder's length."""
    from .dims import Expression, dim_params, parse

    first: dict[str, tuple[str, int, int]] = {}  # dim name -> (input, axis, size) where it was first met
    for spec in inputs:
        if not spec.rank_known:
            continue
        shape = value_shape(feeds[spec.name])
        for axis, (have, param) in enumerate(zip(shape, dim_params(spec))):
            if not param or have == 0 or isinstance(parse(param), Expression):
                continue
            other, other_axis, size = first.setdefault(param, (spec.name, axis, have))
            if size != have:
                raise NormfuseError(f"{where}: input {spec.name!r} has {have} on axis {axis} and input {other!r} "
                                    f"{size} on axis {other_axis}, but the model names both axes {param!r}: "
                                    "one name, one size")


def load(path: str | Path, *, providers: list[str] | None = None, device: int = 0, cuda_graph: bool = False):
    """An OrtModel for `.onnx`, a TensorRTModel for `.plan`/`.engine`."""
    path = require_file(path)
    if path.suffix in ONNX_SUFFIXES:
        if cuda_graph:
            raise NormfuseError(f"{path}: CUDA graphs are offered for TensorRT engines only")
        return OrtModel(path, providers=providers, device=device)
    if path.suffix in ENGINE_SUFFIXES:
        return TensorRTModel(path, device=device, cuda_graph=cuda_graph)
    raise NormfuseError(f"{path}: unknown model type {path.suffix!r}; expected .onnx or .plan")


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime-gpu is installed and a GPU is visible, else CPU."""
    from .backends import availability

    if availability("ort-cuda").present:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# ONNX Runtime's graph transformers that fuse spelled-out norms into its own norm ops (their names
# as its sessions know them; tests/test_validate_levels.py checks that they still turn every one
# off). A level followed by WITHOUT_NORM_FUSIONS ("all-without-norm-fusions") runs without them.
ORT_NORM_FUSIONS = ("LayerNormFusion", "LayerNormFusionL1", "LayerNormFusionL2", "SimplifiedLayerNormFusion",
                    "SkipLayerNormFusion", "BiasSkipLayerNormFusion", "EmbedLayerNormFusion",
                    "GroupQueryAttentionPreNormFusion")
WITHOUT_NORM_FUSIONS = "-without-norm-fusions"


def cuda_provider_options(device: int) -> dict[str, str]:
    """The CUDA provider's options for every normfuse session (keys known since ONNX Runtime 1.20)."""
    return {
        "device_id": str(device),
        # its Skip*LayerNormalization kernels otherwise sum in fp16/bf16 (E[x^2] - E[x]^2 for the
        # LayerNorm, until ONNX Runtime PR #28682): fp32 statistics, as the op contract says
        "enable_skip_layer_norm_strict_mode": "1",
        # fp32 MatMuls in fp32: with TF32 (its default) they keep 10 mantissa bits, and fp32
        # validation would judge that rounding, not the rewrite
        "use_tf32": "0",
        # the memory pool grows by what is asked, not to the next power of two, so the device
        # memory a run leaves in use is the graph's, not the pool's last doubling
        "arena_extend_strategy": "kSameAsRequested",
    }


def new_session(ort: Any, model: str | bytes, options: Any, providers: list[str], provider_options: list[dict],
                disabled_optimizers: set[str] | None = None) -> tuple[Any, str]:
    """(an ONNX Runtime session, what ONNX Runtime printed if a provider failed and it fell back to
    the CPU, or ""). That fallback is only printed, to stdout, and its reason is the one to give."""
    printed = io.StringIO()
    # only where there is a provider to fall back from: stdout is the process's, taken for a moment
    with redirect_stdout(printed) if providers != ["CPUExecutionProvider"] else nullcontext():
        session = ort.InferenceSession(model, options, providers=providers, provider_options=provider_options,
                                       disabled_optimizers=disabled_optimizers)
    said = next((line.strip() for line in printed.getvalue().splitlines() if line.startswith("EP Error")), "")
    return session, said[:300]


def cuda_fallback_message(said: str) -> str:
    """Why a session asked for the CUDA provider runs on the CPU: ONNX Runtime's own words where it
    printed them, else the usual cause."""
    if said:
        return f"ONNX Runtime's CUDA provider did not load ({said})"
    return ("ONNX Runtime's CUDA provider did not load (cuDNN 9 and cuBLAS for the CUDA that onnxruntime-gpu "
            "was built for are needed: the nvidia-* wheels torch brings, or a CUDA install on the library path)")


class OrtModel:
    """An ONNX Runtime session. On the CUDA provider, inputs and outputs go through I/O binding:
    inputs are uploaded into device buffers kept between calls (torch CUDA tensors are bound in
    place, without a copy) and outputs stay on the device until they are returned."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, device: int = 0,
                 threads: int | None = None, profile_prefix: str | None = None, optimization: str = "all"):
        from .backends import import_onnxruntime, refuse_plugin_ops

        ort = import_onnxruntime()

        self.path = Path(path)
        refuse_plugin_ops(self.path, "ONNX Runtime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        level, without_norms, rest = optimization.partition(WITHOUT_NORM_FUSIONS)
        if level not in levels or rest or (without_norms and level == "none"):
            raise NormfuseError(f"unknown ONNX Runtime optimisation level {optimization!r}; choose from {', '.join(levels)}"
                                f" (any but none may end in {WITHOUT_NORM_FUSIONS!r})")
        options.graph_optimization_level = levels[level]
        if threads:
            options.intra_op_num_threads = threads
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.providers = list(providers or default_providers())
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise NormfuseError(f"{self.path}: ONNX Runtime here has no {', '.join(missing)} "
                                f"(it has {', '.join(ort.get_available_providers())})")
        provider_options = [cuda_provider_options(device) if p == "CUDAExecutionProvider" else {}
                            for p in self.providers]
        if "CUDAExecutionProvider" in self.providers:
            _preload_cuda_libraries(ort)
        disabled = set(ORT_NORM_FUSIONS) if without_norms else None
        try:
            self.session, fallback = new_session(ort, str(self.path), options, self.providers, provider_options,
                                                 disabled)
        except Exception as exc:
            if missing_kernel(str(exc)):
                raise MissingKernel(self.path, first_line(exc)) from None
            raise NormfuseError(f"{self.path}: ONNX Runtime cannot load it: {first_line(exc)}") from None
        self.device = device
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        if "CUDAExecutionProvider" in self.providers and not self.on_cuda:
            # ONNX Runtime falls back to the CPU, saying so only on stdout, when the CUDA provider does not load
            raise NormfuseError(f"{self.path}: {cuda_fallback_message(fallback)}")
        self.inputs = _with_unknown_ranks(self.path, [_ort_spec(v) for v in self.session.get_inputs()])
        self.outputs = [_ort_spec(v) for v in self.session.get_outputs()]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self._lock = threading.Lock()
        # errors come back as NormfuseError (below), not also as ONNX Runtime's own log line
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        self._binding: Any = None
        self._bound: dict[str, tuple] = {}  # name -> (shape, dtype, OrtValue or torch tensor)
        self._host_feeds: dict[str, np.ndarray] = {}  # what run_bound() feeds on the CPU

    def __repr__(self) -> str:
        return signature(type(self).__name__, self.path, self.session.get_providers()[0], self.inputs, self.outputs)

    def run(self, feeds: dict) -> dict:
        check_feeds(self.inputs, feeds, str(self.path), allow_empty=True)
        torch_in = any(is_torch(v) for v in feeds.values())
        torch_on_cuda = torch_in and any(is_torch(v) and v.device.type == "cuda" for v in feeds.values())
        # ONNX Runtime takes concurrent runs of one session; only the CUDA path's reused binding is
        # shared state, so only it holds the lock
        if self._bfloat16_in(feeds) and not (self.on_cuda and torch_on_cuda):
            # ONNX Runtime's run() takes and gives no numpy bfloat16, and a bfloat16 OrtValue on the
            # device reaches numpy only through a CUDA build of torch: outputs bound to the host
            results = self._run_binding(feeds, keep=set())[0]
        elif not self.on_cuda:
            arrays = {k: to_numpy(v) for k, v in feeds.items()}
            with self._failures_named(feeds):
                results = dict(zip(self.output_names, self.session.run(None, arrays, self._run_options)))
        else:
            with self._lock:
                self.bind(feeds)
                self.run_bound()
                values = self._binding.get_outputs()
                if torch_on_cuda:
                    import torch

                    # Device to device through DLPack; cloned, since the binding reuses its outputs.
                    return {name: torch.from_dlpack(value._ortvalue.to_dlpack()).clone()
                            for name, value in zip(self.output_names, values)}
                results = {name: ortvalue_to_numpy(value) for name, value in zip(self.output_names, values)}
        if torch_in:
            device = next(v.device for v in feeds.values() if is_torch(v))
            return {k: to_torch(v, device) for k, v in results.items()}
        return results

    def run_keeping(self, feeds: dict, keep) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One run in which the outputs named in `keep` stay where ONNX Runtime wrote them, as
        OrtValues (in GPU memory on the CUDA provider), so a later run takes them back as inputs
        without a trip through the host: a decoder's KV cache, fed back every step. `feeds` takes
        such OrtValues besides numpy arrays and torch tensors. Returns (the other outputs as numpy,
        the kept ones)."""
        check_feeds(self.inputs, feeds, str(self.path), allow_empty=True)
        keep = {keep} if isinstance(keep, str) else set(keep)  # one name, or several
        unknown = sorted(keep - set(self.output_names))
        if unknown:
            raise NormfuseError(f"{self.path}: {unknown[0]!r} is not an output of the model")
        return self._run_binding(feeds, keep)  # a binding of its own: runs alongside others

    def _bfloat16_in(self, feeds: dict) -> bool:
        """Whether a feed or an output is bfloat16, which ONNX Runtime's run() cannot take or give
        as numpy (it has no numpy bfloat16): such a run goes through a binding of its bits."""
        return (any(not is_ortvalue(v) and dtype_name(v.dtype) == "bfloat16" for v in feeds.values())
                or any(spec.dtype == "bfloat16" for spec in self.outputs))

    def _run_binding(self, feeds: dict, keep: set) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """`run_keeping`'s run, through a binding of its own (so no lock is needed)."""
        import onnxruntime as ort

        device = ("cuda", self.device) if self.on_cuda else ("cpu", 0)
        binding = self.session.io_binding()  # one per run: the kept outputs must outlive it
        for name, value in feeds.items():
            if is_ortvalue(value):
                binding.bind_ortvalue_input(name, value)
                continue
            array = np.ascontiguousarray(to_numpy(value))
            if dtype_name(array.dtype) == "bfloat16":  # ONNX Runtime knows no numpy bfloat16: bind its bits
                host = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), _element_type("bfloat16"),
                                                                 "cpu", 0)
                host.update_inplace(array.view(np.uint16))
                binding.bind_ortvalue_input(name, host)
            else:
                binding.bind_cpu_input(name, array)  # copied to the device by ONNX Runtime where needed
        for name in self.output_names:
            if name in keep:
                binding.bind_output(name, *device)
            else:
                binding.bind_output(name)  # to the host
        with self._failures_named(feeds):
            self.session.run_with_iobinding(binding, self._run_options)
        values = dict(zip(self.output_names, binding.get_outputs()))
        kept = {name: values[name] for name in keep}
        return {name: ortvalue_to_numpy(v) for name, v in values.items() if name not in keep}, kept

    def bind(self, feeds: dict) -> None:
        """Bind `feeds` for `run_bound()`: on the CUDA provider into device buffers, reused while shape
        and dtype hold; on the CPU as numpy arrays."""
        import onnxruntime as ort

        if not self.on_cuda:
            self._host_feeds = {k: to_numpy(v) for k, v in feeds.items()}
            return
        if self._binding is None:
            self._binding = self.session.io_binding()
        binding = self._binding
        for name, value in feeds.items():
            shape, dtype = tuple(value.shape), dtype_name(value.dtype)
            if is_torch(value) and value.device.type == "cuda":
                # on the session's GPU (a copy if torch holds it on another: kernels read only their own device)
                tensor = value.to(f"cuda:{self.device}").contiguous()
                binding.bind_input(name, "cuda", self.device, _element_type(dtype), list(shape), tensor.data_ptr())
                self._bound[name] = (shape, dtype, tensor)  # keeps the tensor alive while bound
                continue
            array = np.ascontiguousarray(to_numpy(value))
            if dtype == "bfloat16":  # numpy has no bfloat16 ONNX Runtime knows: copy its bits into a bfloat16 tensor
                array = array.view(np.uint16)
            cached = self._bound.get(name)
            if cached and cached[0] == shape and cached[1] == dtype and isinstance(cached[2], ort.OrtValue):
                cached[2].update_inplace(array)
            else:
                ortvalue = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _element_type(dtype), "cuda",
                                                                     self.device)
                ortvalue.update_inplace(array)
                binding.bind_ortvalue_input(name, ortvalue)
                self._bound[name] = (shape, dtype, ortvalue)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device)
        torch_on_cuda = [v for v in feeds.values() if is_torch(v) and v.device.type == "cuda"]
        if torch_on_cuda:
            import torch

            # ONNX Runtime reads bound torch tensors on a stream of its own: work torch queued to
            # write them (on its current stream, and a copy to the session's GPU) must be done first
            for device in {t.device for t in torch_on_cuda} | {torch.device("cuda", self.device)}:
                torch.cuda.current_stream(device).synchronize()

    def run_bound(self) -> None:
        """One run on the bound buffers, no host copies: what a benchmark times."""
        if not self.on_cuda:
            with self._failures_named(self._host_feeds):
                self.session.run(None, self._host_feeds, self._run_options)
            return
        self._binding.synchronize_inputs()
        with self._failures_named(self._bound):
            self.session.run_with_iobinding(self._binding, self._run_options)
        self._binding.synchronize_outputs()

    @contextmanager
    def _failures_named(self, feeds: dict):
        """ONNX Runtime's failure during a run (an index past a table, a shape the graph cannot
        take) as a one-line NormfuseError naming the model and the input shapes. `feeds`: arrays, OrtValues
        or the binding's (shape, dtype, buffer) records; read only when a run fails."""
        try:
            yield
        except Exception as exc:
            # a run through I/O binding fails with a plain RuntimeError
            if not (type(exc).__module__.startswith("onnxruntime") or type(exc) is RuntimeError):
                raise
            message = first_line(exc)
            message = message.split(" : ", 2)[-1] if message.startswith("[ONNXRuntimeError]") else message
            shapes = ", ".join(f"{name} {list(value[0] if isinstance(value, tuple) else value_shape(value))}"
                               for name, value in feeds.items())
            if missing_kernel(message):
                raise MissingKernel(self.path, message) from None
            outside = _index_outside_its_table(self.path, feeds)
            if outside:  # ONNX Runtime's words after it: another node may have failed first
                raise IndexOutsideTable(f"{self.path}: {outside} (ONNX Runtime: {message})") from None
            raise RunFailure(f"{self.path}: ONNX Runtime failed to run it on {shapes}: {message}") from None

    def end_profiling(self) -> str:
        return self.session.end_profiling()


def _index_outside_its_table(path: Path, feeds: dict) -> str | None:
    """After a failed run: the first integer input holding an index past the table it indexes (a
    token id outside the vocabulary), said plainly, or None. ONNX Runtime's own words name a
    Gather deep in the graph, not the input. Gather takes -rows..rows-1."""
    from .backends import index_bounds

    try:
        bounds = index_bounds(path)
    except Exception:  # the model already failed; its own error stands
        return None
    for name, rows in bounds.items():
        value = feeds.get(name)
        if value is None:
            continue
        value = value[2] if isinstance(value, tuple) else value  # the binding's (shape, dtype, buffer)
        try:
            array = value.numpy() if is_ortvalue(value) else to_numpy(value)
        except Exception:  # a device that failed may not give its values back: the run's own error stands
            return None
        bad = np.argwhere((array < -rows) | (array >= rows))
        if len(bad):
            where = tuple(int(i) for i in bad[0])
            return (f"input {name!r} holds {int(array[where])} at {list(where)}, outside the {rows} rows of the "
                    f"table it indexes (0..{rows - 1})")
    return None


def _element_type(dtype: str) -> Any:
    """What ONNX Runtime's binding calls take: a numpy type, or the ONNX type number for bfloat16."""
    return ONNX_ELEMENT_TYPES[dtype] if dtype == "bfloat16" else numpy_dtype(dtype).type


def _preload_cuda_libraries(ort: Any) -> None:
    """Let ONNX Runtime (>= 1.21) load CUDA and cuDNN from the nvidia-* wheels (torch's) if present."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:  # nothing to preload: the libraries may be on the system path
        pass


def ortvalue_to_numpy(value) -> np.ndarray:
    """An OrtValue on any device as numpy; bfloat16 (which ONNX Runtime cannot give numpy) via DLPack and torch."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    import torch

    return to_numpy(torch.from_dlpack(value._ortvalue.to_dlpack()))


def _with_unknown_ranks(path: Path, specs: list[TensorSpec]) -> list[TensorSpec]:
    """ONNX Runtime reports an input the model gives no shape as a scalar ([]): the file says
    which of its rank-0 inputs are scalars and which take any shape."""
    if not any(spec.shape == () for spec in specs):
        return specs
    from .triton_repo import onnx_signature

    unknown = {io.name for io in onnx_signature(path)[0] if not io.rank_known}
    return [replace(spec, rank_known=False) if spec.name in unknown else spec for spec in specs]


def _ort_spec(value) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
    params = tuple(d if isinstance(d, str) and d else None for d in value.shape)
    return TensorSpec(value.name, _ORT_TYPES.get(value.type, value.type), shape, params)


class TensorRTModel:
    """A deserialised TensorRT engine run with `execute_async_v3` on its own CUDA stream.

    Device buffers are torch CUDA tensors (torch with CUDA is needed on the serving machine), one
    per I/O tensor, reallocated only when a shape changes. The normfuse plugins are AOT plugins:
    their kernels are inside the engine, so nothing has to be registered to load it (an AOT
    Python plugin has only a build-time interface, IPluginV3QuickAOTBuild, in TensorRT 10.9 to
    11.x: at run time TensorRT launches the embedded kernel itself, and NVIDIA's sample runs such
    engines in trtexec).

    TensorRT calls used, all present with these signatures in the bindings of 10.9, 10.13 and
    11.x: Runtime.deserialize_cuda_engine(buffer) (None on failure), create_execution_context()
    (default STATIC allocation; 10.11 added an overload taking an IRuntimeConfig), num_io_tensors,
    get_tensor_name/mode/dtype/shape, get_tensor_profile_shape(name, 0) -> [min, opt, max],
    num_optimization_profiles, set_input_shape(name, tuple) -> bool, get_tensor_shape,
    set_tensor_address(name, int), execute_async_v3(stream handle) -> bool.
    """

    def __init__(self, path: str | Path, device: int = 0, cuda_graph: bool = False):
        from .tensorrt_engine import import_tensorrt, trt_dtype_name

        import_tensorrt()
        import tensorrt as trt

        torch = _cuda_torch()
        self.path = Path(path)
        self.torch = torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                # A plan loads only in the TensorRT version that built it (a 10.x plan never in 11.x),
                # on the GPU architecture it was built for: say which of the two it is when the sidecar tells.
                from plugins.build import driver_cuda_version

                from .tensorrt_engine import gpu_info, read_sidecar

                raise NormfuseError(deserialize_failure(self.path, read_sidecar(self.path), str(trt.__version__),
                                                        gpu_info(device).get("compute_capability"),
                                                        driver_cuda_version()))
            self.context = self.engine.create_execution_context()
            if self.context is None:  # it reserves the activation memory of the profile's largest shapes
                raise NormfuseError(f"{self.path}: TensorRT could not create an execution context for this engine "
                                    "(the GPU is short of memory for its largest profile shapes?)")
            self.stream = torch.cuda.Stream(device=self.device)
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        # (min, max) of each input in optimisation profile 0 (the only one export.tensorrt_engine builds)
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        dim_params = _sidecar_dim_params(self.path)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(d if d >= 0 else None for d in _dims(self.engine.get_tensor_shape(name)))
            spec = TensorSpec(name, trt_dtype_name(self.engine.get_tensor_dtype(name)), shape, dim_params.get(name, ()))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and self.engine.is_shape_inference_io(name):
                # its values (in host memory) size other tensors: the device buffers here would be misread
                raise NormfuseError(f"{self.path}: input {name!r} is a shape tensor, whose values set other "
                                    "tensors' shapes; normfuse runs engines whose inputs are data")
            (self.inputs if is_input else self.outputs).append(spec)
            if is_input and None in shape and self.engine.num_optimization_profiles > 0:
                try:
                    low, _, high = (tuple(_dims(d)) for d in self.engine.get_tensor_profile_shape(name, 0))
                except ValueError:  # Dims with nbDims -1 (no profile shape): TensorRT's own check stays
                    continue
                if len(low) == len(high) == len(shape):
                    self._profile[name] = (low, high)
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, Any] = {}
        self._buffers: dict[str, Any] = {}
        self._shapes: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return signature(type(self).__name__, self.path, f"TensorRT, {self.device}", self.inputs, self.outputs)

    def _buffer(self, name: str, shape: tuple, dtype: str):
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)
            self._buffers[name] = buf
            self.context.set_tensor_address(name, buf.data_ptr())
            self._graphs.clear()  # captured graphs hold the old addresses
        return buf

    def run(self, feeds: dict) -> dict:
        check_feeds(self.inputs, feeds, str(self.path))
        check_named_dims_agree(self.inputs, feeds, str(self.path))
        device = next((v.device for v in feeds.values() if is_torch(v)), None)
        with self._lock, self.torch.cuda.device(self.device):
            key = self.bind(feeds)
            self.launch(key)
            self.stream.synchronize()
            outputs = {s.name: self._buffers[s.name] for s in self.outputs}
            if device is not None:  # on the inputs' device, as OrtModel gives them; a copy: the buffers are reused
                return {k: v.to(device, copy=True) for k, v in outputs.items()}
            return {k: to_numpy(v) for k, v in outputs.items()}

    def bind(self, feeds: dict) -> tuple:
        """Copy feeds into the input buffers, set shapes, size the outputs; returns the shape key."""
        torch = self.torch
        # TensorRT runs on the device current when it is called (export.run's bench and
        # bench/graphs call bind() and launch() directly, not through run()).
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # CUDA tensors fed in were written on the caller's stream: the copies below, on ours,
            # must not start before that work is done.
            self.stream.wait_stream(caller)
            reshaped = False
            for spec in self.inputs:
                value = feeds[spec.name]
                shape = tuple(int(d) for d in value.shape)
                if self._shapes.get(spec.name) != shape:
                    reshaped = True
                    # Checked against the profile first: TensorRT documents set_input_shape's False only
                    # as "some error occurred" (and logs it), so the range is named here.
                    low_high = self._profile.get(spec.name)
                    problem = profile_violation(shape, *low_high) if low_high else None
                    if problem or not self.context.set_input_shape(spec.name, shape):
                        raise NormfuseError(f"{self.path}: input {spec.name!r} shape {list(shape)} is outside the "
                                            f"engine's optimisation profile{' (' + problem + ')' if problem else ''} "
                                            "(see its .json sidecar)")
                    self._shapes[spec.name] = shape
                buf = self._buffer(spec.name, shape, spec.dtype)
                source = value if is_torch(value) else to_torch(to_numpy(value))
                buf.copy_(source, non_blocking=True)
                if source.is_cuda:  # the copy runs on our stream after bind() returns: torch must not reuse it first
                    source.record_stream(self.stream)
            if reshaped:  # the outputs are sized once per set of input shapes
                self._size_outputs()
        return tuple(sorted(self._shapes.items()))

    def _size_outputs(self) -> None:
        """Output buffers for the input shapes just set, or a one-line error where TensorRT cannot
        size them before the run."""
        try:
            unset = self.context.infer_shapes()
        except RuntimeError as exc:  # a shape the engine cannot take together with the others
            raise NormfuseError(f"{self.path}: TensorRT cannot run these input shapes together "
                                f"({', '.join(f'{n} {list(v)}' for n, v in self._shapes.items())}): "
                                f"{first_line(exc, 160)}") from None
        if unset:
            raise NormfuseError(f"{self.path}: TensorRT needs more than the input shapes for {', '.join(unset)}")
        for spec in self.outputs:
            shape = tuple(d for d in _dims(self.context.get_tensor_shape(spec.name)))
            if any(d < 0 for d in shape):  # known only once it has run (a NonZero's count, say)
                raise NormfuseError(f"{self.path}: output {spec.name!r} has a shape that depends on its values "
                                    f"({list(shape)}), which normfuse cannot size before the run")
            self._buffer(spec.name, shape, spec.dtype)

    def launch(self, key: tuple) -> None:
        """Enqueue one execution (replaying the CUDA graph for this shape when enabled)."""
        with self.torch.cuda.device(self.device):  # the context's device must be current for TensorRT
            if not self.cuda_graph:
                self.execute()
                return
            graph = self._graphs.get(key)
            if graph is None:
                # One plain run first: TensorRT defers some work to the first enqueue after a shape change.
                self.execute()
                self.stream.synchronize()
                graph = self.torch.cuda.CUDAGraph()
                try:
                    # thread-local: other threads' models (one per thread, as the module says) may run
                    # meanwhile; one capture at a time, since entering one synchronises the device
                    with _CAPTURE_LOCK, self.torch.cuda.graph(graph, stream=self.stream,
                                                              capture_error_mode="thread_local"):
                        captured = self.context.execute_async_v3(self.stream.cuda_stream)
                except RuntimeError as exc:  # the capture's end fails: an engine with loops or conditionals
                    raise NormfuseError(f"{self.path}: this engine cannot be captured as a CUDA graph "
                                        f"({first_line(exc, 160)}; engines with loops or conditionals cannot): "
                                        "run without --cuda-graph") from None
                if not captured:  # an enqueue TensorRT could not capture: said, never replayed empty
                    raise NormfuseError(f"{self.path}: TensorRT execution failed while capturing a CUDA graph "
                                        "(see the log above; run without --cuda-graph)")
                self._graphs[key] = graph
            with self.torch.cuda.stream(self.stream):
                graph.replay()

    def execute(self) -> None:
        """One execute_async_v3 on our stream; its False (TensorRT logged why) is an error."""
        with self.torch.cuda.device(self.device):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise NormfuseError(f"{self.path}: TensorRT execution failed (see the log above)")


_CAPTURE_LOCK = threading.Lock()  # CUDA graph captures, one at a time in the process


def profile_violation(shape: tuple[int, ...], low: tuple[int, ...], high: tuple[int, ...]) -> str | None:
    """Why `shape` lies outside a profile's [low, high] (from engine.get_tensor_profile_shape), or None."""
    if len(shape) != len(low):
        return f"rank {len(shape)}, the profile has rank {len(low)}"
    for axis, (have, lo, hi) in enumerate(zip(shape, low, high)):
        if not lo <= have <= hi:
            return f"axis {axis} is {have}, the profile allows {lo}..{hi}"
    return None


def _sidecar_dim_params(path: Path) -> dict[str, tuple[str | None, ...]]:
    """{tensor: names of its dynamic axes} as the ONNX graph gave them, from the engine's sidecar
    (an engine keeps -1 for a dynamic axis and forgets its name)."""
    from .tensorrt_engine import read_sidecar

    try:
        io = (read_sidecar(path) or {}).get("io") or {}
    except (OSError, ValueError):  # an unreadable sidecar: the engine still runs, its axes go unnamed
        return {}
    return {t["name"]: tuple(t.get("dim_params") or ()) for kind in ("inputs", "outputs") for t in io.get(kind, [])}


def deserialize_failure(path: Path, sidecar: dict | None, tensorrt_version: str, compute_capability: str | None,
                        driver: tuple[int, int] | None = None) -> str:
    """The one-line error when deserialize_cuda_engine returns None."""
    from .tensorrt_engine import engine_mismatches

    problems = engine_mismatches(sidecar, tensorrt_version, compute_capability, driver)
    if problems:
        return f"{path}: TensorRT could not deserialise this engine: {'; '.join(problems)} (rebuild it here)"
    if sidecar is None:
        return (f"{path}: TensorRT {tensorrt_version} could not deserialise this engine and it has no .json sidecar "
                "to say what built it (another TensorRT version or GPU?)")
    return f"{path}: TensorRT could not deserialise this engine (see the TensorRT log above and its .json sidecar)"


def _dims(dims: Any) -> list[int]:
    """A tensorrt.Dims as a list (it has __len__ and __getitem__)."""
    return [int(dims[i]) for i in range(len(dims))]


def _cuda_torch():
    try:
        import torch
    except ImportError:
        raise NormfuseError("running a TensorRT engine needs torch with CUDA for its device buffers") from None
    if not torch.cuda.is_available():
        raise NormfuseError("running a TensorRT engine needs a CUDA device usable from torch "
                            f"(torch {torch.__version__} sees none)")
    return torch
