"""The TensorRT plugin definitions.

Without TensorRT: registration fails with a clear error, and the registered functions are
recorded by a stand-in of `tensorrt.plugin`'s decorators (it builds nothing) to check names, the
parameter lists and annotations `tensorrt.plugin` validates (as read in TensorRT 10.9, 10.13 and
11.4), and the AOT kernel description (kernel name, PTX, launch parameters, integer arguments in
TensorRT's order). With TensorRT and a GPU: a fused ONNX graph parses into an engine whose plugin
output matches the float64 reference.
"""
from __future__ import annotations

import importlib.util
import inspect
import struct
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

from normops import OP, OPS, PLUGIN_NAMESPACE, PLUGIN_VERSION, run_reference
from plugins import build, config
from plugins import trt as plugin_trt


def _tensorrt_plugin_importable() -> bool:
    # tensorrt-stubs alone leaves an importable, empty `tensorrt` namespace package
    try:
        return importlib.util.find_spec("tensorrt.plugin") is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(_tensorrt_plugin_importable(), reason="TensorRT is installed here")
def test_registration_without_tensorrt_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(plugin_trt, "_registered", False)
    with pytest.raises(ImportError, match="TensorRT >= 10.9"):
        plugin_trt.register_tensorrt_plugins()


# ------------------------------------------------------------------ a stand-in for tensorrt.plugin
class Expr:
    """A shape expression: constant when built from an int, symbolic when from a name."""

    def __init__(self, value):
        self.value = value

    @property
    def is_constant(self):
        return isinstance(self.value, int)

    def constant_value(self):
        return self.value

    def __add__(self, other):
        return Expr(f"({self.value} + {getattr(other, 'value', other)})")

    def __mul__(self, other):
        return Expr(f"({self.value} * {getattr(other, 'value', other)})")

    def __floordiv__(self, other):
        return Expr(f"({self.value} // {getattr(other, 'value', other)})")


class Desc:
    def __init__(self, shape, dtype):
        self.shape_expr = [Expr(d) for d in shape]
        self.dtype = dtype

    def like(self):
        return Desc([e.value for e in self.shape_expr], self.dtype)


def fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13-stand-in"
    trt.float32, trt.float16, trt.bfloat16 = "f32", "f16", "bf16"
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registry = {"register": {}, "autotune": {}, "aot_impl": {}}
    trtp.op = types.SimpleNamespace()  # like tensorrt.plugin.op.<namespace>.<name>

    def decorator(kind):
        def named(name):
            def record(fn):
                if name in trtp.registry[kind]:  # tensorrt.plugin refuses a second definition
                    raise ValueError(f"{name} already has a {kind} definition")
                trtp.registry[kind][name] = fn
                if kind == "register":
                    namespace, op = name.split("::")
                    setattr(trtp.op, namespace, getattr(trtp.op, namespace, types.SimpleNamespace()))
                    setattr(getattr(trtp.op, namespace), op, fn)
                return fn
            return record
        return named

    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    trtp.TensorDesc = Desc

    class KernelLaunchParams:
        """The seven fields TensorRT's KernelLaunchParams has; any other name is an AttributeError."""

        __slots__ = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

        def __init__(self):
            self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
            self.shared_mem = 0

    class SymInt32:
        def __init__(self, value):
            self.value = value

    class SymExprs:
        pass

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, items):
            inst = cls()
            inst.items = list(items)
            return inst

    class AutoTuneCombination:
        def __init__(self, io_types=None, layouts=None, tactics=None):
            self.types, self.layouts, self.tactics = io_types, layouts, tactics

    trtp.KernelLaunchParams, trtp.SymInt32, trtp.SymExprs = KernelLaunchParams, SymInt32, SymExprs
    trtp.SymIntExprs, trtp.AutoTuneCombination = SymIntExprs, AutoTuneCombination
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def stand_in(monkeypatch):
    trt, trtp = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(plugin_trt, "_registered", False)
    # PTX is checked by test_plugins_ptx; here only which module is asked for matters
    monkeypatch.setattr(build, "ptx_for_launch",
                        lambda op, x, g, cfg, arch=None: f"// ptx {op} {x} {g} {cfg.kernel}")
    plugin_trt.register_tensorrt_plugins()
    return trt, trtp


class PropertyExpr(Expr):
    """constant_value as a property, as the abstract SymExpr declares it (ShapeExpr has a method)."""

    @property
    def constant_value(self):  # type: ignore[override]
        return self.value


class FakeExpr(Expr):
    """A ShapeExpr read outside a shape calculation: is_constant raises RuntimeError."""

    @property
    def is_constant(self):
        raise RuntimeError("Not accessible for fake 'ShapeExpr's")


def test_constant_hidden_is_read_from_either_api():
    assert plugin_trt._constant(Expr(4096)) == 4096
    assert plugin_trt._constant(PropertyExpr(4096)) == 4096
    assert plugin_trt._constant(Expr("h")) is None
    assert plugin_trt._constant(FakeExpr(4096)) is None


def test_epsilon_arrives_as_the_parsers_one_element_float32_field():
    field = np.array([1e-5], np.float32)  # what the plugin creator holds for epsilon
    assert plugin_trt.epsilon_value(field.astype(np.float32)) == float(np.float32(1e-5))
    assert plugin_trt.epsilon_value(1e-6) == float(np.float32(1e-6))
    with pytest.raises(ValueError, match="one number"):
        plugin_trt.epsilon_value(np.zeros(2, np.float32))


def test_registering_twice_defines_nothing_twice(stand_in):
    _, trtp = stand_in
    before = {kind: dict(fns) for kind, fns in trtp.registry.items()}
    plugin_trt._registered = False  # as a second copy of the module would see it
    plugin_trt.register_tensorrt_plugins()
    assert trtp.registry == before and plugin_trt._registered


def test_all_four_ops_are_registered_under_the_rewriters_names(stand_in):
    _, trtp = stand_in
    names = {f"{PLUGIN_NAMESPACE}::{op}" for op in OPS}
    for kind in ("register", "autotune", "aot_impl"):
        assert set(trtp.registry[kind]) == names
    assert PLUGIN_VERSION == "1"  # tensorrt.plugin registers every plugin as version "1"


@pytest.mark.parametrize("op", list(OPS))
def test_signatures_follow_the_contract(stand_in, op):
    """Inputs in contract order (beta always present for the TensorRT target), then epsilon."""
    _, trtp = stand_in
    spec = OPS[op]
    inputs = list(spec.inputs) + (["beta"] if spec.centered else [])
    name = f"{PLUGIN_NAMESPACE}::{op}"
    assert list(inspect.signature(trtp.registry["register"][name]).parameters) == inputs + ["epsilon"]
    assert list(inspect.signature(trtp.registry["aot_impl"][name]).parameters) == inputs + [
        "epsilon", "outputs", "tactic"]
    assert list(inspect.signature(trtp.registry["autotune"][name]).parameters) == inputs + ["outputs"]
    outs = trtp.registry["register"][name](*[Desc((4, 8), "f16") for _ in inputs], epsilon=np.array([1e-5], np.float32))
    assert len(outs if isinstance(outs, tuple) else (outs,)) == len(spec.outputs)


def autotune(trtp, op: str) -> list:
    """The registered autotune function's combinations (tensors and outputs passed as None)."""
    spec = OPS[op]
    n_in = len(spec.inputs) + (1 if spec.centered else 0)
    return trtp.registry["autotune"][f"{PLUGIN_NAMESPACE}::{op}"](*[None] * (n_in + 1))


def aot_impl(trtp, op: str, batch, tactic: int) -> tuple:
    """The registered aot_impl on bf16 x of shape (batch, "seq", 4096) with fp32 gamma/beta, epsilon
    as the parser's one-element float32 field, called as the AOT plugin calls it."""
    spec = OPS[op]
    inputs = list(spec.inputs) + (["beta"] if spec.centered else [])
    descs = [Desc((batch, "seq", 4096), "bf16") if n in ("x", "residual") else Desc((4096,), "f32") for n in inputs]
    outputs = tuple(Desc((batch, "seq", 4096), "bf16") for _ in spec.outputs)
    return trtp.registry["aot_impl"][f"{PLUGIN_NAMESPACE}::{op}"](
        *descs, epsilon=np.array([1e-6], np.float32), outputs=outputs, tactic=tactic)


@pytest.mark.parametrize("op", list(OPS))
def test_autotune_lists_every_dtype_pair(stand_in, op):
    _, trtp = stand_in
    spec = OPS[op]
    n_in = len(spec.inputs) + (1 if spec.centered else 0)
    combos = autotune(trtp, op)
    types_ = [[t.strip() for t in c.types.split(",")] for c in combos]
    assert len(types_) == 5  # fp32; fp16 and bf16 each with gamma/beta in their own dtype or fp32
    for t in types_:
        assert len(t) == n_in + len(spec.outputs)
        assert {"BF16", "FP16"} & set(t) or set(t) == {"FP32"}


@pytest.mark.parametrize("op", list(OPS))
def test_autotune_offers_the_layout_tactics_with_every_type_combination(stand_in, op):
    _, trtp = stand_in
    assert all(list(c.tactics) == list(config.TACTICS) for c in autotune(trtp, op))
    assert all(t > 0 for t in config.TACTICS)  # tensorrt.plugin: custom tactics are positive; 0 is TensorRT's


@pytest.mark.parametrize("tactic", [0, *config.TACTICS])
@pytest.mark.parametrize("op", list(OPS))
def test_aot_impl_launches_the_tactics_layout(stand_in, op, tactic):
    _, trtp = stand_in
    name, ptx, params, _ = aot_impl(trtp, op, 1, tactic)
    cfg = config.launch_config(op, "bfloat16", 1, 4096, layout=config.tactic_layout(op, "bfloat16", 4096, tactic))
    assert name == cfg.kernel.encode() and ptx == f"// ptx {op} bfloat16 float32 {cfg.kernel}".encode()
    assert params.block_x == cfg.block
    assert params.grid_x.value == f"(((1 * seq) + {cfg.rows_per_block - 1}) // {cfg.rows_per_block})"
    if tactic in (0, 1):  # TensorRT's default and the first custom tactic: the launch table's layout
        assert cfg.kernel == config.launch_config(op, "bfloat16", 1, 4096).kernel


@pytest.mark.parametrize("op", list(OPS))
def test_aot_impl_describes_the_launch(stand_in, op):
    _, trtp = stand_in
    name, ptx, params, extra = aot_impl(trtp, op, 2, 0)  # tactic 0, as the creator passes it by default
    cfg = config.launch_config(op, "bfloat16", 8, 4096)
    assert name == cfg.kernel.encode()
    assert ptx == f"// ptx {op} bfloat16 float32 {cfg.kernel}".encode()
    assert params.block_x == cfg.block and params.shared_mem == 0
    assert params.grid_x.value == f"(((2 * seq) + {cfg.rows_per_block - 1}) // {cfg.rows_per_block})"
    # what the AOT plugin checks of the result: str or bytes twice, the launch parameters, a
    # SymExprs whose every item is a SymInt32
    assert isinstance(name, (str, bytes)) and isinstance(ptx, (str, bytes))
    assert isinstance(params, trtp.KernelLaunchParams) and isinstance(extra, trtp.SymExprs)
    assert all(isinstance(a, trtp.SymInt32) for a in extra.items)
    rows, hidden, eps = (a.value for a in extra.items)
    assert rows.value == "(2 * seq)" and hidden == 4096
    assert struct.unpack("<f", struct.pack("<i", eps))[0] == pytest.approx(1e-6)


# ------------------------------------------------------------------ what tensorrt.plugin validates
SERIALIZABLE_ATTRIBUTE_TYPES = (int, float, bytes, bool, str)
SERIALIZABLE_ARRAY_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_)
RESERVED_NAMES = {"outputs", "stream", "tactic"}


def _array_dtype(annotation):
    """T of `numpy.ndarray[..., numpy.dtype[T]]` (how tensorrt.plugin reads an array attribute), else None."""
    if typing.get_origin(annotation) is not np.ndarray or len(typing.get_args(annotation)) != 2:
        return None
    (dtype,) = typing.get_args(typing.get_args(annotation)[1]) or (None,)
    return dtype


def _tuple_of(annotation, cls, count):
    return typing.get_origin(annotation) is tuple and list(typing.get_args(annotation)) == [cls] * count


def _str_or_bytes(annotation):
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return set(args) <= {str, bytes} and args


@pytest.mark.parametrize("op", list(OPS))
def test_annotations_are_what_tensorrt_plugin_accepts(stand_in, op):
    """register: all parameters annotated with objects (not strings), no defaults, TensorDescs first,
    attributes of a serialisable type, the return annotation counting the outputs; autotune and
    aot_impl: the same tensors, attributes with the registered types, then outputs (and tactic)."""
    _, trtp = stand_in
    spec = OPS[op]
    name = f"{PLUGIN_NAMESPACE}::{op}"
    n_out = len(spec.outputs)

    register = inspect.signature(trtp.registry["register"][name])
    tensors, attributes = [], {}
    for pname, param in register.parameters.items():
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and param.default is inspect.Parameter.empty
        assert param.annotation is not inspect.Parameter.empty and not isinstance(param.annotation, str)
        if inspect.isclass(param.annotation) and issubclass(param.annotation, trtp.TensorDesc):
            assert not attributes, "tensors and attributes may not be interspersed"
            tensors.append(pname)
        else:
            assert pname not in RESERVED_NAMES
            assert param.annotation in SERIALIZABLE_ATTRIBUTE_TYPES or _array_dtype(param.annotation) in SERIALIZABLE_ARRAY_DTYPES
            attributes[pname] = param.annotation
    # the rewriter's one attribute, a FLOAT, which the parser passes as a one-element float32 field:
    # annotated as a float32 array, since a `float` annotation makes TensorRT 10.9 to 11.0 call
    # float() on that array, which NumPy >= 2.4 refuses
    assert list(attributes) == ["epsilon"] and _array_dtype(attributes["epsilon"]) is np.float32
    ret = register.return_annotation
    assert (ret is trtp.TensorDesc and n_out == 1) or _tuple_of(ret, trtp.TensorDesc, n_out)

    autotune = inspect.signature(trtp.registry["autotune"][name])
    params = list(autotune.parameters)
    assert params[:len(tensors)] == tensors and params[-1] == "outputs"
    assert all(p in attributes for p in params[len(tensors):-1])
    assert _tuple_of(autotune.parameters["outputs"].annotation, trtp.TensorDesc, n_out)
    assert typing.get_origin(autotune.return_annotation) is list
    assert typing.get_args(autotune.return_annotation) == (trtp.AutoTuneCombination,)

    aot = inspect.signature(trtp.registry["aot_impl"][name])
    # every registered attribute, in order: the AOT plugin passes all of them positionally
    assert list(aot.parameters) == tensors + list(attributes) + ["outputs", "tactic"]
    for pname in tensors:
        assert aot.parameters[pname].annotation is trtp.TensorDesc
    for pname, annotation in attributes.items():  # compared with == by tensorrt.plugin
        assert aot.parameters[pname].annotation == annotation
    assert _tuple_of(aot.parameters["outputs"].annotation, trtp.TensorDesc, n_out)
    assert aot.parameters["tactic"].annotation is int
    ret = aot.return_annotation
    assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
    kernel, code, launch, extra = typing.get_args(ret)
    assert _str_or_bytes(kernel) and _str_or_bytes(code)
    assert launch is trtp.KernelLaunchParams and issubclass(extra, trtp.SymExprs)


def test_the_module_keeps_annotations_as_objects():
    """`from __future__ import annotations` would turn them into strings that issubclass rejects."""
    source = Path(plugin_trt.__file__).read_text()
    assert not any(line.startswith("from __future__ import annotations") for line in source.splitlines())


@pytest.mark.parametrize("op", list(OPS))
def test_autotune_strings_parse_as_tensorrt_reads_them(stand_in, op):
    """One comma-separated entry per input then output, each FP32, FP16 or a trt.DataType name."""
    _, trtp = stand_in
    spec = OPS[op]
    n_io = len(spec.inputs) + (1 if spec.centered else 0) + len(spec.outputs)
    for combo in autotune(trtp, op):
        entries = [t.strip() for t in combo.types.split(",")]
        assert len(entries) == n_io and set(entries) <= {"FP32", "FP16", "BF16"}  # BF16 is DataType.BF16
        # tactics: positive integers (tensorrt.plugin's AutoTuneCombination; 0 is TensorRT's default)
        assert combo.layouts == "LINEAR" and all(isinstance(t, int) and t > 0 for t in combo.tactics)


# ------------------------------------------------------------------ the real thing
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("op", ["RMSNorm", "AddLayerNorm"])
def test_fused_onnx_graph_builds_and_matches_the_reference(op, tmp_path):
    import tensorrt as trt
    import torch
    from onnx import TensorProto, helper, numpy_helper

    plugin_trt.register_tensorrt_plugins()
    spec = OPS[op]
    rows, hidden = 37, 1024
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((rows, hidden)).astype(np.float16),
            "residual": rng.standard_normal((rows, hidden)).astype(np.float16),
            "gamma": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float16),
            "beta": (0.1 * rng.standard_normal(hidden)).astype(np.float16)}
    inputs = list(spec.inputs) + (["beta"] if spec.centered else [])
    activations = [n for n in inputs if n in ("x", "residual")]
    node = helper.make_node(op, inputs, list(spec.outputs), domain="normfuse", epsilon=1e-5,
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
    graph = helper.make_graph(
        [node], "fused",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["rows", hidden]) for n in activations],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["rows", hidden]) for n in spec.outputs],
        initializer=[numpy_helper.from_array(data[n], n) for n in inputs if n not in activations])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("normfuse", 1)])

    from export.tensorrt_engine import network_flags

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed (as TensorRT 11 always is): the plugin runs on the graph's fp16, the output
    # buffers below are fp16; weakly typed, TensorRT 10 could pick the FP32 combination
    network = builder.create_network(network_flags(trt.NetworkDefinitionCreationFlag, "strongly-typed", True))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [parser.get_error(i) for i in range(parser.num_errors)]
    cfg = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for n in activations:
        profile.set_shape(n, (1, hidden), (rows, hidden), (4 * rows, hidden))
    cfg.add_optimization_profile(profile)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, cfg))
    context = engine.create_execution_context()
    tensors = {}
    for n in activations:
        tensors[n] = torch.from_numpy(data[n]).cuda()
        context.set_input_shape(n, (rows, hidden))
        context.set_tensor_address(n, tensors[n].data_ptr())
    for n in spec.outputs:
        tensors[n] = torch.empty(rows, hidden, dtype=torch.float16, device="cuda")
        context.set_tensor_address(n, tensors[n].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    expected = run_reference(op, {n: data[n] for n in inputs})
    for n, e in zip(spec.outputs, expected):
        assert OP["float16"].passes(tensors[n].float().cpu().numpy(), e), n
