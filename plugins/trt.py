"""TensorRT plugins for the normfuse ops, through `tensorrt.plugin` (TensorRT >= 10.9).

Each op is registered as `normfuse::<op name>` (normops.PLUGIN_NAMESPACE, version "1"), the names
and namespace the rewriter's `tensorrt` target writes into the fused ONNX graph, so TensorRT's ONNX
parser picks these plugins up. `aot_impl` returns the kernel name, its PTX, the launch parameters
and the integer arguments, so the kernel is embedded in the engine and serving needs no Python.

Kernel parameter order is TensorRT's: inputs (x, [residual], gamma, [beta]), then the extra
integer arguments (rows, hidden, epsilon's fp32 bits: extra arguments are integers only), then
outputs (y, [sum]). `config.launch_config` computes the launch shape, as it does for the launcher.

What `tensorrt.plugin` (read in TensorRT 10.9, 10.13 and 11.4) requires of the functions below:
- `register`: every parameter annotated, no defaults; tensors (`TensorDesc`) first, then the
  attributes (`epsilon: EpsilonField`, see there); the return annotation is `TensorDesc` or
  `Tuple[TensorDesc, ...]` with one entry per output (it is how TensorRT counts the outputs).
- `autotune`: the tensors, any of the attributes in registration order, then `outputs`; returns
  `List[AutoTuneCombination]` ("FP32, FP16, ..." one type per input then output, layout "LINEAR",
  custom tactics as positive integers: TensorRT times each and keeps the fastest; see config.TACTICS).
- `aot_impl`: the tensors, then *every* registered attribute (the AOT plugin passes all of them
  positionally when it asks for the launch, although the check at registration accepts a
  subset), then `outputs` and `tactic`; the return annotation is a 4-tuple: `Union[str, bytes]`
  twice, `KernelLaunchParams`, a subclass of `SymExprs`; every extra argument must be a `SymInt32`.
- The ONNX parser hands the plugin creator only the attributes it declared (`epsilon`): the
  `plugin_namespace` and `plugin_version` attributes select the creator and are not passed on, and
  the FLOAT attribute arrives as a one-element float32 field.

This module must not use `from __future__ import annotations`: `tensorrt.plugin` reads the
annotations of the registered functions as objects (`issubclass(annotation, TensorDesc)`).
"""
from typing import Any, TypeAlias

import numpy as np

from normops import OPS, PLUGIN_NAMESPACE, SUPPORTED_DTYPES

from . import build, config

# contract dtype -> the name tensorrt.plugin.AutoTuneCombination uses for it
TRT_TYPE_NAME = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}

# epsilon's annotation: a float32 array (of one element), not `float`. The ONNX parser passes the
# FLOAT attribute as a one-element float32 plugin field; for a `float` annotation the plugin creator
# of TensorRT 10.9 to 11.0 converts it with float(array), which NumPy >= 2.4 refuses ("only
# 0-dimensional arrays can be converted to Python scalars"), so the plugin could not be created.
# For an array annotation every version converts with astype(float32). Spelled as ndarray[...]
# rather than numpy.typing.NDArray so that its origin is numpy.ndarray whatever NumPy's typing does.
EpsilonField: TypeAlias = np.ndarray[Any, np.dtype[np.float32]]

_registered = False


def _dtype_name(dtype: Any) -> str:
    import tensorrt as trt

    names: dict[trt.DataType, str] = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    if dtype not in names:
        raise TypeError(f"normfuse plugins support {SUPPORTED_DTYPES}, got {dtype}")
    return names[dtype]


def type_combinations(op_name: str) -> list[str]:
    """AutoTuneCombination strings: x-like tensors share one dtype; gamma/beta are it or FP32."""
    spec = OPS[op_name]
    out = []
    for x_dtype in SUPPORTED_DTYPES:
        for g_dtype in dict.fromkeys((x_dtype, "float32")):
            types = []
            for name in spec.all_inputs + spec.outputs:
                types.append(TRT_TYPE_NAME[g_dtype if name in ("gamma", "beta") else x_dtype])
            out.append(", ".join(types))
    return out


def _row_count(shape_expr: Any) -> Any:
    """Product of all dimensions but the last (a symbolic expression when they are dynamic)."""
    rows: Any = 1
    for i in range(len(shape_expr) - 1):
        rows = shape_expr[i] if isinstance(rows, int) and rows == 1 else rows * shape_expr[i]
    return rows


def _constant(expr: Any) -> int | None:
    """The value of a constant shape expression, else None. On ShapeExpr (10.9 to 11.4)
    `is_constant` is a property and `constant_value()` a method, though their abstract base
    declares both as properties, so either form is accepted; a fake expression (outside a shape
    calculation) raises RuntimeError, which counts as not constant."""
    try:
        if not expr.is_constant:
            return None
        value = expr.constant_value
        return int(value() if callable(value) else value)
    except (AttributeError, RuntimeError, TypeError):
        return None


def epsilon_value(epsilon: Any) -> float:
    """The plugin attribute as a float: a one-element array (EpsilonField) or a plain number."""
    values = np.asarray(epsilon, dtype=np.float32).reshape(-1)
    if values.size != 1:
        raise ValueError(f"epsilon must be one number, got {values.size} values")
    return float(values[0])


def aot_kernel(trtp: Any, op_name: str, x: Any, gamma: Any, epsilon: Any, tactic: int = 0) -> tuple:
    """(kernel name, PTX, KernelLaunchParams, SymIntExprs) for one op instance and the tactic
    TensorRT is timing or chose (config.tactic_layout: 0 is the launch table's layout)."""
    x_dtype = _dtype_name(x.dtype)
    g_dtype = _dtype_name(gamma.dtype)
    hidden = _constant(x.shape_expr[len(x.shape_expr) - 1])
    if hidden is None:
        hidden = _constant(gamma.shape_expr[0])
    rows = _row_count(x.shape_expr)
    cfg = config.launch_config(op_name, x_dtype, rows, hidden, layout=config.tactic_layout(op_name, x_dtype, hidden, tactic))
    ptx = build.ptx_for_launch(op_name, x_dtype, g_dtype, cfg)

    params = trtp.KernelLaunchParams()
    params.grid_x = cfg.grid
    params.block_x = cfg.block
    params.shared_mem = cfg.shared_mem
    hidden_expr = hidden if hidden is not None else x.shape_expr[len(x.shape_expr) - 1]
    extra = trtp.SymIntExprs.from_tuple([
        trtp.SymInt32(rows), trtp.SymInt32(hidden_expr), trtp.SymInt32(config.epsilon_bits(epsilon_value(epsilon))),
    ])
    return cfg.kernel.encode(), ptx.encode(), params, extra


def register_tensorrt_plugins() -> None:
    """Register RMSNorm, LayerNorm, AddRMSNorm and AddLayerNorm with TensorRT (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp  # type: ignore[import-not-found, unused-ignore]
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            "normfuse's TensorRT plugins need TensorRT >= 10.9 with its Python bindings "
            "(pip install tensorrt); without it use the ONNX Runtime path"
        ) from exc
    if not hasattr(trtp, "aot_impl"):
        raise ImportError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; need >= 10.9")
    # tensorrt.plugin refuses a second definition of a plugin id; another copy of this module (or
    # a caller) may already have registered ours in this process
    ours = getattr(getattr(trtp, "op", None), PLUGIN_NAMESPACE, None)  # trtp.op.<namespace>.<name>
    if ours is not None and all(hasattr(ours, op) for op in OPS):
        _registered = True
        return

    from typing import List, Tuple, Union  # noqa: UP035  (tensorrt.plugin matches these annotations)

    def combinations(op_name: str) -> List[trtp.AutoTuneCombination]:
        # every type combination with the layout tactics, which TensorRT times at the profile's opt shape
        return [trtp.AutoTuneCombination(types, "LINEAR", list(config.TACTICS)) for types in type_combinations(op_name)]

    # RMSNorm: x, gamma -> y
    name = OPS["RMSNorm"].qualified_name

    @trtp.register(name)
    def rms_desc(x: trtp.TensorDesc, gamma: trtp.TensorDesc, epsilon: EpsilonField) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(name)
    def rms_tune(x: trtp.TensorDesc, gamma: trtp.TensorDesc,
                 outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return combinations("RMSNorm")

    # epsilon must stay in every aot_impl: the AOT plugin calls it with all registered attributes
    @trtp.aot_impl(name)
    def rms_aot(x: trtp.TensorDesc, gamma: trtp.TensorDesc, epsilon: EpsilonField, outputs: Tuple[trtp.TensorDesc],
                tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot_kernel(trtp, "RMSNorm", x, gamma, epsilon, tactic)

    # LayerNorm: x, gamma, beta -> y
    name = OPS["LayerNorm"].qualified_name

    @trtp.register(name)
    def ln_desc(x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc,
                epsilon: EpsilonField) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(name)
    def ln_tune(x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc,
                outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return combinations("LayerNorm")

    @trtp.aot_impl(name)
    def ln_aot(x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, epsilon: EpsilonField,
               outputs: Tuple[trtp.TensorDesc],
               tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot_kernel(trtp, "LayerNorm", x, gamma, epsilon, tactic)

    # AddRMSNorm: x, residual, gamma -> y, sum
    name = OPS["AddRMSNorm"].qualified_name

    @trtp.register(name)
    def add_rms_desc(x: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc,
                     epsilon: EpsilonField) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return x.like(), x.like()

    @trtp.autotune(name)
    def add_rms_tune(x: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc,
                     outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return combinations("AddRMSNorm")

    @trtp.aot_impl(name)
    def add_rms_aot(x: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, epsilon: EpsilonField,
                    outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
                    tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot_kernel(trtp, "AddRMSNorm", x, gamma, epsilon, tactic)

    # AddLayerNorm: x, residual, gamma, beta -> y, sum
    name = OPS["AddLayerNorm"].qualified_name

    @trtp.register(name)
    def add_ln_desc(x: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc,
                    epsilon: EpsilonField) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return x.like(), x.like()

    @trtp.autotune(name)
    def add_ln_tune(x: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc,
                    outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return combinations("AddLayerNorm")

    @trtp.aot_impl(name)
    def add_ln_aot(x: trtp.TensorDesc, residual: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc,
                   epsilon: EpsilonField, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
                   tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot_kernel(trtp, "AddLayerNorm", x, gamma, epsilon, tactic)

    _registered = True
