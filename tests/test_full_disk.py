"""A full disk: a write that fails for want of room is one line naming the output wanted (not a
temporary or the file copied), exit 1, and leaves no half-written file or new empty folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.cli import run_cli
from export.errors import NormfuseError
from export.files import atomic_path, folder_made_for, no_room_names

FULL = "/dev/full"  # every write to it fails with ENOSPC, as on a full disk: the kernel's own error
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full on this system")


def write_to_full_device() -> None:
    with open(FULL, "wb") as device:
        device.write(b"x" * 4096)
        device.flush()


@needs_dev_full
def test_a_full_disk_in_an_atomic_write_names_the_file_wanted(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(NormfuseError, match=f"^{target}: cannot write \\(No space left on device\\)$"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            write_to_full_device()
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model.onnx"]


@needs_dev_full
def test_a_full_disk_while_copying_names_the_destination(tmp_path):
    source = tmp_path / "weights.data"
    source.write_bytes(b"w" * 100)
    with pytest.raises(NormfuseError, match="^repo/model: cannot write \\(No space left on device\\)$"):
        with no_room_names("repo/model"):
            shutil.copyfile(source, FULL)


@needs_dev_full
def test_a_full_disk_anywhere_else_is_one_line_not_an_internal_error(capsys):
    assert run_cli(write_to_full_device) == 1
    assert capsys.readouterr().err == "normfuse: error: cannot write (No space left on device)\n"

    def missing():
        open(os.path.join(os.sep, "no", "such", "file"))
    assert run_cli(missing) == 3  # any other OSError stays a bug's one line
    assert capsys.readouterr().err.startswith("normfuse: internal error: FileNotFoundError")


def test_a_failed_block_takes_away_the_folder_it_made_and_keeps_one_that_was_there(tmp_path):
    made, there = tmp_path / "new" / "outputs", tmp_path / "there"
    there.mkdir()
    (there / "old.json").write_text("{}")
    for folder in (made, there):
        with pytest.raises(RuntimeError):
            with folder_made_for(folder) as f:
                (f / "inputs.json").write_text("half")
                raise RuntimeError("stopped")
    assert not (tmp_path / "new").exists() and sorted(os.listdir(there)) == ["inputs.json", "old.json"]
    with folder_made_for(made) as f:
        (f / "inputs.json").write_text("{}")
    assert (made / "inputs.json").read_text() == "{}"


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB file system, where mounting one is allowed (root, or a container that lets it)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"normfuse-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip() or made.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def wide_layer_norm(path):
    """A LayerNorm over 65536 values a row: its gamma and beta (512 KiB) do not fit the disk."""
    hidden = 1 << 16
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
                              [numpy_helper.from_array(np.ones(hidden, np.float32), "g"),
                               numpy_helper.from_array(np.zeros(hidden, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_commands_on_a_full_disk_say_so_and_leave_nothing(full_disk, tmp_path, capsys):
    from export.rewrite.__main__ import main as rewrite_main
    from export.triton_repo import main as triton_main

    model = wide_layer_norm(tmp_path / "wide.onnx")
    assert rewrite_main([str(model), "-o", str(full_disk / "fused.onnx")]) == 1
    assert capsys.readouterr().err.endswith(f"{full_disk / 'fused.onnx'}: cannot write (No space left on device)\n")
    assert triton_main([str(model), "--repo", str(full_disk / "repo")]) == 1
    assert capsys.readouterr().err.endswith(f"{full_disk / 'repo' / 'wide'}: cannot write (No space left on device)\n")
    # with --report: both are written, or neither
    assert rewrite_main([str(model), "-o", str(full_disk / "fused.onnx"), "--report", str(tmp_path / "r.json")]) == 1
    assert not (tmp_path / "r.json").exists()
    capsys.readouterr()
    with pytest.raises(OSError), open(full_disk / "filler", "wb") as filler:  # the disk now full to the last byte
        filler.write(b"0" * (128 << 10))
    assert rewrite_main([str(model), "-o", str(tmp_path / "fused.onnx"), "--report", str(full_disk / "r.json")]) == 1
    assert capsys.readouterr().err.endswith(f"{full_disk / 'r.json'}: cannot write (No space left on device)\n")
    assert not (tmp_path / "fused.onnx").exists()
    (full_disk / "filler").unlink()
    assert os.listdir(full_disk) == []
