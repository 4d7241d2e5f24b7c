"""Runners: one interface over the engines that can execute a graph, and what is present here.

A runner is built from a model path and has `run(feeds) -> dict[name, ndarray]`. Heavy or
optional libraries are imported only when a runner needs them, so this module imports anywhere.
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import NormfuseError, RunFailure, first_line

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt")
ORT_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}


@dataclass
class Availability:
    present: bool
    reason: str = ""  # why not, when absent


ORT_INSTALL_HINT = ("install exactly one of the two ONNX Runtime wheels: pip install 'normfuse[cpu]' "
                    "(onnxruntime) or, on a CUDA machine, pip install 'normfuse[gpu]' (onnxruntime-gpu)")


def import_onnxruntime():
    """The onnxruntime module, or a one-line error saying which extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise NormfuseError(f"ONNX Runtime is not installed ({exc}); {ORT_INSTALL_HINT}") from None
    return onnxruntime


def ort_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


def availability(backend: str) -> Availability:
    """Whether `backend` can run on this machine, and if not, why in one sentence."""
    if backend == "ort-cpu":
        return Availability(True)
    if backend == "ort-cuda":
        if "CUDAExecutionProvider" not in ort_providers():
            return Availability(False, "onnxruntime has no CUDAExecutionProvider (install the `gpu` extra: "
                                       "pip uninstall -y onnxruntime && pip install onnxruntime-gpu)")
        if not gpu_present().present:
            return Availability(False, "onnxruntime-gpu is installed but no NVIDIA GPU is visible")
        return cuda_provider_loads()
    if backend == "tensorrt":
        from .tensorrt_engine import INSTALL_HINT, tensorrt_status

        present, reason = tensorrt_status()
        if not present:
            return Availability(False, f"{reason}; {INSTALL_HINT}")
        if not gpu_present().present:
            return Availability(False, "TensorRT is installed but no NVIDIA GPU is visible")
        return Availability(True)
    raise ValueError(backend)


@lru_cache(maxsize=None)
def cuda_provider_loads(device: int = 0) -> Availability:
    """Whether a session on ONNX Runtime's CUDA provider really runs there: the provider is listed
    by every onnxruntime-gpu, but its libraries (cuDNN, cuBLAS) may not load, or no GPU may be
    visible to it, and then a session quietly runs on the CPU. Tried once, on a one-node model."""
    from onnx import TensorProto, helper

    from .runtime import _preload_cuda_libraries, cuda_fallback_message, cuda_provider_options, new_session

    ort = import_onnxruntime()
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # any ONNX Runtime loads it
    options = ort.SessionOptions()
    options.log_severity_level = 3
    _preload_cuda_libraries(ort)
    try:
        with warnings.catch_warnings():  # ONNX Runtime's warning says what the result says below
            warnings.simplefilter("ignore")
            session, said = new_session(ort, model.SerializeToString(), options,
                                        ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                        [cuda_provider_options(device), {}])
    except Exception as exc:
        return Availability(False, f"ONNX Runtime's CUDA provider did not load ({first_line(exc, 200)})")
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return Availability(False, cuda_fallback_message(said))
    return Availability(True)


def gpu_present() -> Availability:
    if shutil.which("nvidia-smi") is None:
        return Availability(False, "no NVIDIA GPU on this machine (nvidia-smi not found)")
    return Availability(True)


def resolve_backends(requested: str) -> tuple[list[str], list[dict]]:
    """The backends to run for `--backend requested`, and the skipped ones as {stage, reason}."""
    if requested == "auto":
        chosen, skipped = ["ort-cpu"], []
        for backend in ("ort-cuda", "tensorrt"):
            state = availability(backend)
            if state.present:
                chosen.append(backend)
            else:
                skipped.append({"stage": f"{backend} build, validation and bench", "reason": state.reason})
        return chosen, skipped
    state = availability(requested)
    if not state.present:
        raise NormfuseError(f"--backend {requested} cannot run here: {state.reason}")
    return (["ort-cpu", requested] if requested != "ort-cpu" else ["ort-cpu"]), []


class OrtRunner:
    """An ONNX Runtime session on one backend; outputs as numpy arrays by name.

    `bind()` then `run_bound()` run the session alone (export.runtime.OrtModel): on `ort-cuda`
    through I/O binding, inputs uploaded once into device buffers reused across calls.
    """

    def __init__(self, model_path: str | Path, backend: str = "ort-cpu", profile_prefix: str | None = None,
                 threads: int | None = None, optimization: str = "all"):
        from .runtime import OrtModel

        providers = [ORT_PROVIDERS[backend]] + (["CPUExecutionProvider"] if backend == "ort-cuda" else [])
        self.model = OrtModel(model_path, providers=providers, threads=threads, profile_prefix=profile_prefix,
                              optimization=optimization)
        self.session = self.model.session
        self.output_names = self.model.output_names
        self.name = backend

    def run(self, feeds: dict) -> dict:
        return self.model.run(feeds)

    def bind(self, feeds: dict) -> None:
        """Bind feeds once; then `run_bound()` runs without host copies."""
        self.model.bind(feeds)

    def run_bound(self) -> None:
        self.model.run_bound()

    def end_profiling(self) -> str:
        return self.model.end_profiling()


def refuse_plugin_ops(model_path, backend: str) -> None:
    """normfuse ops are TensorRT plugins; ONNX Runtime cannot run them, so say that plainly."""
    from normops import DOMAIN

    from .onnx_io import graph_skeleton
    from .rewrite.scopes import all_nodes

    if any(node.domain == DOMAIN for node in all_nodes(graph_skeleton(model_path))):
        raise NormfuseError(f"{model_path}: holds normfuse plugin ops (the tensorrt target), which {backend} cannot "
                            "run; rewrite with --target onnxruntime, build a TensorRT engine from it, or validate "
                            "with --backend onnx-reference")


class ReferenceRunner:
    """onnx's reference evaluator with the fused ops (normfuse's and ONNX Runtime's) computed by the
    normops references (export.rewrite.evaluate).

    Slow but exact and dtype-complete (bfloat16 included): it checks the TensorRT-target graph
    on a machine that has no TensorRT, using the very definitions the kernels are tested against.
    """

    def __init__(self, model_path: str | Path):
        import onnx

        from .rewrite.evaluate import evaluator

        model = onnx.load(str(model_path), load_external_data=False)
        self.path = model_path
        self.weights = _weights_as_inputs(model, Path(model_path).parent)
        try:
            self.evaluator = evaluator(model)  # fused ops by normops; fp32 accumulation on half inputs
        except Exception as exc:  # an op or opset the evaluator does not know
            raise NormfuseError(f"{model_path}: onnx's reference evaluator cannot run it: "
                                f"{exc.__class__.__name__}: {first_line(exc)}") from None
        self.output_names = [o.name for o in model.graph.output]
        self.name = "onnx-reference"

    def run(self, feeds: dict) -> dict:
        try:
            # numpy's warnings for what the graph computes on purpose (T5 takes the log of 0 for
            # its relative positions and masks it out afterwards) are not the user's business here
            with np.errstate(all="ignore"):
                return dict(zip(self.output_names, self.evaluator.run(None, {**self.weights, **feeds})))
        except NormfuseError as exc:  # a node no runtime here has (export.rewrite.evaluate)
            raise NormfuseError(f"{self.path}: {exc}") from None
        except Exception as exc:  # inputs the graph cannot take
            shapes = ", ".join(f"{name} {list(np.shape(value))}" for name, value in feeds.items())
            raise RunFailure(f"{self.path}: onnx's reference evaluator failed on {shapes}: "
                             f"{exc.__class__.__name__}: {first_line(exc)}") from None


def _weights_as_inputs(model, base_dir: Path) -> dict:
    """Turn the main graph's initializers into graph inputs, in place, and return their values, read
    once: the evaluator keeps the model it is given and makes its own numpy copy of every
    initializer, so a model's weights would sit in memory twice (three times while loading)."""
    import onnx

    from .onnx_io import tensor_array

    weights = {}
    declared = {i.name for i in model.graph.input}  # an initializer that is also an input: the feeds override it
    for tensor in model.graph.initializer:
        weights[tensor.name] = tensor_array(tensor, base_dir)
        if tensor.name not in declared:
            model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del model.graph.initializer[:]
    return weights


def make_runner(model_path: str | Path, backend: str, shapes: list[tuple[int, int]] | None = None,
                optimization: str = "all", dims: dict[str, int] | None = None):
    """A runner for `backend`. `shapes` (BATCHxSEQ) and `dims` (named dimensions) bound the profile
    of a TensorRT engine built on the fly from an .onnx; `optimization` is ONNX Runtime's graph
    optimisation level (all, extended, basic, none: the graph as written)."""
    if backend in ORT_PROVIDERS:
        return OrtRunner(model_path, backend, optimization=optimization)
    if backend == "onnx-reference":
        return ReferenceRunner(model_path)
    if backend == "tensorrt":
        from .tensorrt_engine import TensorRTRunner, import_tensorrt

        import_tensorrt()  # a one-line error when it is missing
        return TensorRTRunner(Path(model_path), shapes=shapes or [(1, 16), (2, 64)], dims=dict(dims or {}))
    raise ValueError(f"unknown backend {backend!r}")


def random_feeds(model_path: str | Path, batch: int, seq: int, seed: int = 0,
                 dims: dict[str, int] | None = None) -> dict:
    """Random inputs for every graph input of an ONNX file, with dynamic dims sized by `export.dims`."""
    from .triton_repo import onnx_signature

    from .decode import mask_over_the_cache

    inputs, outputs = onnx_signature(model_path)
    feeds = random_arrays(inputs, batch, seq, seed, bounds=index_bounds(model_path), dims=dims, where=str(model_path))
    mask_over_the_cache(feeds, inputs, outputs)  # a merged decoder's cache branch (booleans are made true)
    return feeds


def random_arrays(specs, batch: int, seq: int, seed: int = 0, bounds: dict[str, int] | None = None,
                  dims: dict[str, int] | None = None, where: str = "model") -> dict:
    """Seeded random arrays for `specs` (anything with name, dtype name and shape, None for a
    dynamic axis, and optionally dim_params): dynamic axes are sized by `export.dims.input_shapes`
    (`dims` gives named ones a size; otherwise axis 0 is the batch, other axes the sequence, and a
    name such as 'past + seq' is worked out).

    Floating inputs are standard normal. Integer inputs (token ids, masks, positions of exported
    language models) are uniform in [0, bounds[name]) where `bounds` knows how far they may index
    (see `index_bounds`); an attention mask (an input named `*mask*`) is all ones, as a served
    batch of whole sequences has it (a random one masks whole rows, and ONNX Runtime's
    GroupQueryAttention refuses one shorter than the sequence); other integers are 0 or 1; boolean
    inputs are True."""
    from normops import numpy_dtype

    from .dims import input_shapes

    rng = np.random.default_rng(seed)
    shapes = input_shapes(specs, batch, seq, dims, where)
    feeds = {}
    for spec in specs:
        dims_of = shapes[spec.name]
        try:
            dtype = numpy_dtype(spec.dtype)
        except TypeError:  # 'tensor(string)' and other types numpy has no number for
            dtype = np.dtype(object)
        if dtype.kind in "OSU":
            raise NormfuseError(f"{where}: input {spec.name!r} holds {spec.dtype}: random inputs are numbers only; "
                                "give your own (--inputs of export.validate or export.run)")
        if dtype == np.bool_:
            feeds[spec.name] = np.ones(dims_of, dtype=bool)
        elif np.issubdtype(dtype, np.integer) and "mask" in spec.name.lower() and spec.name not in (bounds or {}):
            feeds[spec.name] = np.ones(dims_of, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[spec.name] = rng.integers(0, (bounds or {}).get(spec.name, 2), size=dims_of).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(dims_of).astype(dtype)
    return feeds


def batch_and_seq(shape) -> tuple[int, int]:
    """(batch, sequence) of an input's shape, as records name it: its first two dims (1 where it has fewer)."""
    dims = list(shape) + [1, 1]
    return int(dims[0]), int(dims[1])


# what transformers and Optimum name inputs that hold no tokens: images, waveforms, spectrograms
NOT_TOKENS = ("pixel", "image", "input_values", "input_features", "audio", "mel", "spectrogram", "wave", "latent",
              "sample")


def tokens_per_run(specs: list, feeds: dict) -> int | None:
    """Tokens one run processes, for a throughput in tokens per second: batch x sequence of the
    first input where it holds tokens: token ids [batch, sequence] (integers), or hidden states
    [batch, sequence, hidden]. None for what holds no tokens: an image or a latent (rank 4 and
    up), a waveform (rank 2, floating point), a spectrogram [batch, mel bins, frames] (rank 3 with
    its middle axis fixed, or named as features, and its last dynamic), and any input named as
    transformers names those (`NOT_TOKENS`: a static [1, 80, 3000] spectrogram is shaped as
    hidden states)."""
    if not specs or specs[0].name not in feeds or any(word in specs[0].name.lower() for word in NOT_TOKENS):
        return None
    from .runtime import value_dtype, value_shape

    spec = specs[0]
    shape, integer = value_shape(feeds[spec.name]), value_dtype(feeds[spec.name]).startswith(("int", "uint"))
    declared = tuple(spec.shape) if getattr(spec, "rank_known", True) else (None,) * len(shape)
    if len(shape) == 2 and integer:
        return int(shape[0] * shape[1])
    params = tuple(getattr(spec, "dim_params", ()) or ()) + (None,) * 3
    spectrogram = len(declared) == 3 and declared[2] is None and (declared[1] is not None
                                                                  or "feature" in (params[1] or "").lower())
    if len(shape) == 3 and not integer and not spectrogram:
        return int(shape[0] * shape[1])
    return None


def leading_dims(feeds: dict) -> tuple[int, int]:
    """(batch, sequence) of a set of inputs: the first input's; 1x1 for a model that takes none."""
    return batch_and_seq(np.shape(next(iter(feeds.values())))) if feeds else (1, 1)


def shape_taken(model_path: str | Path, batch: int, seq: int, dims: dict[str, int] | None = None) -> tuple[int, int]:
    """(batch, sequence) that inputs asked for at `batch` x `seq` really have: an axis the model fixes
    keeps its size (a JAX export with a static sequence of 8 runs 8 tokens whatever --seq says), and
    so does one `dims` names; it then reads as the first input's. An axis that any input takes as
    asked stays as asked: a UNet's first input, the latent [batch, 4, 16, 16], fixes nothing its
    text input [batch, tokens, 32] does not take from --seq."""
    from .dims import input_shapes
    from .triton_repo import onnx_signature

    inputs, _ = onnx_signature(model_path)
    if not inputs:
        return batch, seq
    where = str(model_path)
    asked = input_shapes(inputs, batch, seq, dims, where)
    first_batch, first_seq = batch_and_seq(asked[inputs[0].name])

    def taken(other_batch: int, other_seq: int) -> bool:  # whether some input's shape follows the change
        try:
            return input_shapes(inputs, other_batch, other_seq, dims, where) != asked
        except NormfuseError:  # a size the model refuses: it reads that axis, so it is not fixed
            return True

    return (batch if taken(batch + 1, seq) else first_batch, seq if taken(batch, seq + 1) else first_seq)


# ops that move an input's values without changing them: token ids reshaped before the embedding
# (GPT-2 views input_ids as [-1, length]) are still the ids
_VALUE_PRESERVING = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand", "Transpose"}


def index_bounds(model_path: str | Path) -> dict[str, int]:
    """{integer graph input: rows it may index} for inputs used as Gather indices into a weight,
    directly or through ops that only reshape them (or cast them to another integer type), e.g.
    token ids into an embedding table (its first dim; read without the weight bytes)."""
    from .onnx_io import graph_skeleton
    from .rewrite.scopes import node_bodies, walk_nodes

    graph = graph_skeleton(model_path).graph
    nodes = list(walk_nodes(graph.node))  # If/Loop/Scan bodies too: a merged decoder embeds in a branch
    dims = {t.name: list(t.dims) for t in graph.initializer}
    dims.update({t.name: list(t.dims) for node in nodes for body in node_bodies(node) for t in body.initializer})
    for node in nodes:  # weights written as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            dims[node.output[0]] = list(node.attribute[0].t.dims)
    import onnx

    def is_integer(elem: int) -> bool:
        return elem != 0 and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(elem), np.integer)

    origin = {v.name: v.name for v in graph.input if is_integer(v.type.tensor_type.elem_type)}
    bounds: dict[str, int] = {}
    for node in nodes:  # in topological order, as ONNX requires (a body's nodes after the node holding it)
        casts_to_integer = node.op_type == "Cast" and is_integer(next((a.i for a in node.attribute if a.name == "to"), 0))
        if node.input and node.input[0] in origin and (node.op_type in _VALUE_PRESERVING or casts_to_integer):
            origin[node.output[0]] = origin[node.input[0]]
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in origin:
            continue
        table = dims.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table and -len(table) <= axis < len(table) and table[axis] > 0:
            name = origin[node.input[1]]
            bounds[name] = min(bounds.get(name, table[axis]), table[axis])
    return bounds
