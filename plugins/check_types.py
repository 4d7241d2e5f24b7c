"""Type-check the TensorRT plugin code against `tensorrt-stubs`, without TensorRT installed.

    python -m plugins.check_types            # exit status of mypy

tensorrt-stubs installs its stubs as a top-level `tensorrt/` folder without a py.typed marker,
so mypy ignores them in site-packages, and release 10.13 has two syntax faults (a parameter named
`in`, and a parameter without default after defaulted ones). This copies the stubs into a temporary
folder, repairs those lines, and runs mypy on plugins/ with that folder on MYPYPATH.
`tensorrt.plugin` has no stubs; it is imported as an untyped module.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def repaired_stubs(dest: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    for name in ("tensorrt", "tensorrt_bindings"):
        src = site / name
        if not any(src.glob("*.pyi")):
            raise SystemExit(f"tensorrt-stubs is not installed (no {src}/*.pyi): pip install tensorrt-stubs")
        shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for stub in dest.rglob("*.pyi"):
        text = stub.read_text()
        text = re.sub(r"([(,]\s*)in: ", r"\1in_: ", text)
        # a parameter without default after defaulted ones: give it `= ...`, as stubs may
        fixed = []
        for line in text.splitlines():
            if line.lstrip().startswith("def ") and "= None" in line:
                head, _, rest = line.partition("(")
                params, close, tail = rest.rpartition(")")
                parts, seen_default = [], False
                for p in params.split(", "):
                    if "=" in p:
                        seen_default = True
                    elif seen_default and ":" in p and not p.strip().startswith("*"):
                        p = f"{p} = ..."
                    parts.append(p)
                line = f"{head}({', '.join(parts)}{close}{tail}"
            fixed.append(line)
        stub.write_text("\n".join(fixed) + "\n")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        repaired_stubs(Path(tmp))
        ini = Path(tmp) / "mypy.ini"
        ini.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n"
                       "[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
                       "[mypy-tensorrt]\nignore_errors = True\n")
        env = dict(os.environ, MYPYPATH=tmp)
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ini), "--no-incremental", str(PACKAGE)]
        return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
