"""export.files: outputs appear whole or not at all, with the permissions of any other new file."""
from __future__ import annotations

import os
import stat

import pytest

from export.files import atomic_path, write_json, write_text


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_written_file_has_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "report.md"
    write_text(target, "ok\n")
    assert target.read_text() == "ok\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()  # not mkstemp's 0600
    write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'


def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
