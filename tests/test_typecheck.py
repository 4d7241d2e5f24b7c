"""The TensorRT code is type-checked against tensorrt-stubs, since TensorRT itself cannot be
installed where the tests run: a misspelt TensorRT call fails here instead of on a GPU machine."""
import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["export/tensorrt_engine.py", "export/runtime.py", "export/run.py", "export/triton_repo.py",
           "export/validate.py", "export/backends.py", "export/build.py", "bench/graphs.py", "plugins/trt.py",
           "plugins/launcher.py", "plugins/emulate.py"]
MYPY_INI = """[mypy]
ignore_missing_imports = True
follow_imports = silent
[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]
ignore_errors = True
"""


def _stubs_dir(tmp_path: Path) -> Path:
    """A copy of the installed stubs, mended: tensorrt-stubs 10.13 ships no py.typed and two
    lines of its .pyi are not valid Python (a parameter named `in`, a default after a required)."""
    site = Path(sysconfig.get_paths()["purelib"])
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("tensorrt", "tensorrt_bindings"):
        if (site / name).is_dir():
            shutil.copytree(site / name, stubs / name)
    pyi = stubs / "tensorrt_bindings" / "tensorrt.pyi"
    if pyi.exists():
        text = re.sub(r"([(,] ?)in: ", r"\1in_: ", pyi.read_text())
        pyi.write_text(text.replace(", channel_axis: int)", ", channel_axis: int = ...)"))
    (stubs / "mypy.ini").write_text(MYPY_INI)
    return stubs


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (dev extra)")
def test_tensorrt_code_type_checks_against_the_stubs(tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt" / "__init__.pyi").exists() and not (site / "tensorrt_bindings").is_dir():
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    stubs = _stubs_dir(tmp_path)
    # The stubs must really be in force: a call TensorRT does not have is an error.
    canary = tmp_path / "canary.py"
    canary.write_text("import tensorrt as trt\ntrt.Builder(trt.Logger()).build_engine_that_does_not_exist()\n")

    def mypy(*files):
        return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(stubs / "mypy.ini"),
                               "--cache-dir", str(tmp_path / "cache"), *files], cwd=ROOT, capture_output=True,
                              text=True, env={"MYPYPATH": str(stubs), "PATH": ""}, timeout=600)

    assert "build_engine_that_does_not_exist" in mypy(str(canary)).stdout
    done = mypy(*CHECKED)
    assert done.returncode == 0, done.stdout + done.stderr
