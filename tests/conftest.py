"""Shared fixtures and skip rules: GPU and TensorRT tests skip with the reason they cannot run."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gpu_absent_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (nvidia-smi not found)"
    try:
        import cupy  # noqa: F401

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device visible"
    except Exception as exc:  # cupy missing or driver error
        try:
            import torch

            if not torch.cuda.is_available():
                return f"no CUDA device usable from Python ({exc.__class__.__name__})"
        except ImportError:
            return "neither CuPy nor torch with CUDA is installed"
    return None


def tensorrt_absent_reason() -> str | None:
    # tensorrt-stubs alone makes `import tensorrt` succeed as an empty package: ask the engine
    # module, which tells stubs from bindings.
    from export.tensorrt_engine import tensorrt_status

    present, reason = tensorrt_status()
    return None if present else reason


def pytest_collection_modifyitems(config, items):
    gpu_reason = tensorrt_reason = None
    checked = False
    for item in items:
        # markers, not keywords: a parameter id such as "tensorrt" is a keyword too
        gpu, tensorrt = item.get_closest_marker("gpu"), item.get_closest_marker("tensorrt")
        if not checked and (gpu or tensorrt):
            gpu_reason, tensorrt_reason, checked = gpu_absent_reason(), tensorrt_absent_reason(), True
        if gpu and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if tensorrt and tensorrt_reason:
            item.add_marker(pytest.mark.skip(reason=tensorrt_reason))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(norm, dtype="float32", exporter="dynamo", **config) -> path of a cached tiny export."""
    from export.export_model import export_model
    from models import preset

    cache: dict = {}
    root = tmp_path_factory.mktemp("exports")

    def get(norm: str, dtype: str = "float32", exporter: str = "dynamo", **overrides):
        key = (norm, dtype, exporter, tuple(sorted(overrides.items())))
        if key not in cache:
            config = preset("tiny", norm, dtype=dtype, **overrides)
            name = "-".join([norm, dtype, exporter] + [f"{k}{v}" for k, v in sorted(overrides.items())]) + ".onnx"
            cache[key] = export_model(config, root / name, exporter=exporter,
                                      opset=18 if exporter == "dynamo" else 17).path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def rewritten(exported, tmp_path_factory):
    """rewritten(norm) -> {"reference", "fused" (onnxruntime target), "trt" (tensorrt target)}, cached."""
    from export.rewrite import rewrite_file

    cache: dict = {}

    def get(norm: str) -> dict:
        if norm not in cache:
            root = tmp_path_factory.mktemp(f"rewritten-{norm}")
            reference = exported(norm)
            rewrite_file(reference, root / "fused.onnx", target="onnxruntime")
            rewrite_file(reference, root / "fused-tensorrt.onnx", target="tensorrt")
            cache[norm] = {"reference": reference, "fused": root / "fused.onnx", "trt": root / "fused-tensorrt.onnx"}
        return cache[norm]

    return get


@pytest.fixture(scope="module")
def bench_script():
    """bench_script(name) -> bench/<name>.py loaded as a module with bench/ first on sys.path, as
    `python bench/<name>.py` runs it, so that its sibling modules import (bench/ holds scripts, not a
    package). After the test module the scripts and the siblings they imported are unloaded and
    sys.path is restored: left there, bench/kernels.py would shadow the `kernels` package that
    transformers imports."""
    loaded: list[str] = []
    path = list(sys.path)
    sys.path.insert(0, str(ROOT / "bench"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded.append(spec.name)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
    for name in [n for n, m in list(sys.modules.items()) if Path(getattr(m, "__file__", None) or "/").parent == ROOT / "bench"]:
        sys.modules.pop(name)
    sys.path[:] = path
