"""export.files: outputs appear whole or not at all, with the permissions of any other new file."""
from __future__ import annotations

import os
import stat

import pytest

from export.errors import NormfuseError
from export.files import atomic_path, require_writable, unwritable, write_json, write_text


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


def test_unwritable_says_why_a_path_cannot_take_a_file_or_folder(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert unwritable(tmp_path / "new" / "deeper" / "x.onnx") is None
    assert unwritable(a_file) is None  # replaced atomically
    assert unwritable(tmp_path, folder=True) is None
    assert unwritable(tmp_path / "new" / "dir", folder=True) is None
    assert unwritable(tmp_path) == "is a folder, not a file"
    assert unwritable(a_file, folder=True) == "is a file, not a folder"
    assert unwritable(a_file / "x.onnx") == f"cannot be created: {a_file} is a file"
    assert unwritable(a_file / "d" / "e", folder=True) == f"cannot be created: {a_file} is a file"
    with pytest.raises(NormfuseError, match=f"^{a_file}: is a file, not a folder$"):
        require_writable(a_file, folder=True)
    assert require_writable(tmp_path / "ok.json") == tmp_path / "ok.json"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert unwritable(locked / "x.json") == f"cannot be written: no write permission in {locked}"
    finally:
        locked.chmod(0o755)


def test_atomic_writes_to_an_impossible_path_fail_in_one_line_with_nothing_left(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    with pytest.raises(NormfuseError, match=f"{a_file}/r.json: cannot write \\(cannot be created: {a_file} is a file\\)"):
        write_text(a_file / "r.json", "x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(NormfuseError, match="folder: cannot write \\(is a folder, not a file\\)"):
        write_json(tmp_path / "folder", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder"] and a_file.read_text() == "kept"
    assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.parametrize("where", ["working directory", "elsewhere"])
def test_a_model_with_external_weights_saves_into_any_folder(tmp_path, monkeypatch, where):
    """onnx looks for an existing data file relative to the working directory: saving into the
    folder one works in once failed ("External data file exists"), as for every export over 1 GiB."""
    import numpy as np
    import onnx

    from export.onnx_io import save_model
    from export.rewrite.synth import NormSpec, build

    model = build(NormSpec(hidden=512))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    folder = tmp_path / "out"
    folder.mkdir()
    monkeypatch.chdir(folder if where == "working directory" else tmp_path)
    save_model(model, folder / "m.onnx", external_data=True)
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]
    for loaded in (onnx.load(str(folder / "m.onnx")), model):  # the given model now refers to the file too
        for tensor in loaded.graph.initializer:
            assert np.array_equal(onnx.numpy_helper.to_array(tensor, base_dir=str(folder)), weights[tensor.name])
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(folder / "m.onnx"), load_external_data=False).graph.initializer)


def test_a_model_saved_whole_over_one_with_external_weights_takes_its_weights_file_with_it(tmp_path):
    """The old `m.onnx.data` would otherwise stay beside the new model that no longer reads it;
    it stays where another model in the folder names it, and a file the old model did not name
    stays whatever its name."""
    import shutil

    import onnx

    from export.onnx_io import save_model
    from export.rewrite.synth import NormSpec, build

    model = build(NormSpec(hidden=512))
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    save_model(build(NormSpec(hidden=512)), tmp_path / "m.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    onnx.load(str(tmp_path / "m.onnx"))  # reads every weight it names

    save_model(build(NormSpec(hidden=512)), tmp_path / "m.onnx", external_data=True)
    shutil.copy(tmp_path / "m.onnx", tmp_path / "other.onnx")  # names m.onnx.data too
    save_model(build(NormSpec(hidden=512)), tmp_path / "m.onnx", external_data=False)
    assert (tmp_path / "m.onnx.data").exists()
    onnx.load(str(tmp_path / "other.onnx"))

    (tmp_path / "n.onnx.data").write_bytes(b"not named by n.onnx")
    save_model(build(NormSpec(hidden=512)), tmp_path / "n.onnx", external_data=False)
    save_model(build(NormSpec(hidden=512)), tmp_path / "n.onnx", external_data=False)
    assert (tmp_path / "n.onnx.data").read_bytes() == b"not named by n.onnx"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_export_over_one_with_external_weights_leaves_no_stale_weights_file(tmp_path, exporter):
    from export.export_model import export_model
    from models import preset

    config = preset("tiny", "rmsnorm", layers=1)
    export_model(config, tmp_path / "model.onnx", external_data=True, exporter=exporter)
    assert (tmp_path / "model.onnx.data").exists()
    export_model(config, tmp_path / "model.onnx", external_data=False, exporter=exporter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("external_data", [True, False])
def test_an_export_is_saved_from_torch_without_a_copy_of_the_weights(tmp_path, monkeypatch, external_data, exporter):
    """export_model saves torch's ONNXProgram itself (tensors written one at a time from torch's
    memory), staged beside the target and renamed into place; TorchScript's exporter writes a file
    in a staging folder beside it (past 2 GiB it must). Nothing else is left in the folder."""
    import onnx

    from export.export_model import export_model
    from models import preset

    monkeypatch.chdir(tmp_path)
    result = export_model(preset("tiny", "rmsnorm", layers=1), "model.onnx", external_data=external_data,
                          exporter=exporter)
    expected = ["model.onnx", "model.onnx.data"] if external_data else ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    assert result.external_data is external_data
    mode = stat.S_IMODE(os.stat(tmp_path / "model.onnx").st_mode)
    assert mode == 0o666 & ~current_umask()
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)


def test_an_export_into_a_folder_that_cannot_take_it_is_one_line(tmp_path):
    from export.export_model import export_model
    from models import preset

    (tmp_path / "file").write_text("")
    with pytest.raises(NormfuseError, match="cannot write"):
        export_model(preset("tiny", "rmsnorm", layers=1), tmp_path / "file" / "model.onnx")


class _ProgramOfAnotherTorch:
    """What export_model gets from torch.onnx.export, as other torch releases may shape it: a model
    without onnx_ir's initializer values, or a save() that names its data file its own way."""

    def __init__(self, proto, data_name=None):
        self.model_proto, self.data_name = proto, data_name
        self.model = object() if data_name is None else type("M", (), {"graph": type("G", (), {"initializers": {}})})()

    def save(self, destination, external_data=None):
        import onnx

        onnx.save(self.model_proto, str(destination), save_as_external_data=True, location=self.data_name,
                  size_threshold=0)


@pytest.mark.parametrize("data_name", [None, "weights.bin"])
def test_an_export_from_another_torch_is_saved_through_a_proto(tmp_path, data_name):
    import numpy as np
    import onnx

    from export.onnx_io import save_exported
    from export.rewrite.synth import NormSpec, build

    model = build(NormSpec(hidden=512))  # a scale of 2 KiB: large enough to go to a data file
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    save_exported(_ProgramOfAnotherTorch(model, data_name), tmp_path / "m.onnx",
                  external_data=None if data_name is None else True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["m.onnx"] if data_name is None else ["m.onnx", "m.onnx.data"])
    for tensor in onnx.load(str(tmp_path / "m.onnx")).graph.initializer:
        assert np.array_equal(onnx.numpy_helper.to_array(tensor), weights[tensor.name])


def test_a_model_too_small_for_a_data_file_is_saved_whole(tmp_path):
    """external_data asked for, but no tensor of 1 KiB or more: onnx writes no data file, and there is none."""
    import onnx

    from export.onnx_io import save_model
    from export.rewrite.synth import NormSpec, build

    model = build(NormSpec(hidden=16))
    expected = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx.load(str(tmp_path / "m.onnx")).SerializeToString() == expected


def _written_by_a_tool(folder, one_file: bool):
    """A staging folder as TorchScript's exporter leaves it past 2 GiB (each weight in a file of its
    own), or with every weight in one file at its offset; and the weights by name."""
    import numpy as np
    import onnx

    from export.rewrite.synth import NormSpec, build

    model = build(NormSpec(hidden=512))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="weights.bin" if one_file else None, size_threshold=0)
    assert len(list(folder.iterdir())) > 1 and any(w.nbytes < 1024 for w in weights.values())
    return folder / "model.onnx", {name: np.asarray(w) for name, w in weights.items()}


@pytest.mark.parametrize("one_file", [False, True])
def test_weights_a_tool_wrote_are_gathered_into_one_data_file(tmp_path, one_file):
    """place_written streams each external tensor into `<name>.data` (at its offset in a shared
    file, or from a file of its own); tensors under 1 KiB go inside the model, as save_model keeps them."""
    import numpy as np
    import onnx

    from export.onnx_io import place_written

    written, weights = _written_by_a_tool(tmp_path / "staging", one_file)
    out = tmp_path / "out"
    out.mkdir()
    place_written(written, out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    graph_only = onnx.load(str(out / "m.onnx"), load_external_data=False)
    for tensor in graph_only.graph.initializer:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        assert external == (weights[tensor.name].nbytes >= 1024), tensor.name
        assert np.array_equal(onnx.numpy_helper.to_array(tensor, base_dir=str(out)), weights[tensor.name])


def test_a_model_written_whole_is_renamed_into_place_unread(tmp_path):
    """One protobuf under the size threshold is the file as written; asked for external data, it gets a data file."""
    import onnx

    from export.onnx_io import place_written
    from export.rewrite.synth import NormSpec, build

    for external_data, expected in ((None, ["m.onnx"]), (True, ["m.onnx", "m.onnx.data"])):
        staging, out = tmp_path / f"staging-{external_data}", tmp_path / f"out-{external_data}"
        staging.mkdir()
        out.mkdir()
        onnx.save_model(build(NormSpec(hidden=512)), str(staging / "model.onnx"))
        data = (staging / "model.onnx").read_bytes()
        place_written(staging / "model.onnx", out / "m.onnx", external_data=external_data)
        assert sorted(p.name for p in out.iterdir()) == expected
        assert ((out / "m.onnx").read_bytes() == data) is (external_data is None)


@pytest.mark.parametrize("damage, message", [
    ("short", r"external data of tensor '.*' cannot be read \(.*bytes short\)"),
    ("outside", r"external data of tensor '.*' cannot be read \(location '\.\./w\.bin' is outside the model's folder\)"),
])
def test_weights_that_cannot_be_gathered_are_one_line_and_nothing_is_placed(tmp_path, damage, message):
    import onnx

    from export.onnx_io import place_written, rename_location

    written, _ = _written_by_a_tool(tmp_path / "staging", one_file=True)
    if damage == "short":
        with open(written.parent / "weights.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 100)
    else:
        model = onnx.load(str(written), load_external_data=False)
        rename_location(model, "weights.bin", "../w.bin")
        onnx.save_model(model, str(written))
        (tmp_path / "w.bin").write_bytes((written.parent / "weights.bin").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NormfuseError, match=message):
        place_written(written, out / "m.onnx")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path, monkeypatch, swap):
    """On Linux the new folder and the earlier one swap in one step; where that cannot be, the
    earlier one is moved aside first. Either way the target holds the new files only."""
    import export.files as files

    if swap == "two renames":
        monkeypatch.setattr(files, "_exchange", lambda one, other: False)
    else:
        probe_a, probe_b = tmp_path / "a", tmp_path / "b"
        probe_a.mkdir(), probe_b.mkdir()
        (probe_a / "in_a").write_text("")
        if not files._exchange(probe_a, probe_b):
            pytest.skip("this system cannot swap two paths in one step (renameat2 with RENAME_EXCHANGE)")
        assert (probe_b / "in_a").exists() and not (probe_a / "in_a").exists()

        def no_rename(source, target):  # the swap alone must do it: no moment without the target
            raise AssertionError(f"renamed {source} to {target}")

        monkeypatch.setattr(files.os, "replace", no_rename)
    target = tmp_path / "serve"
    target.mkdir()
    (target / "old.onnx").write_text("old")
    staging = files.staging_folder(tmp_path, ".serve.")
    (staging / "new.onnx").write_text("new")
    files.replace_folder(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.onnx"]
    assert not any(p.name.startswith(".serve") for p in tmp_path.iterdir())


def test_an_earlier_folder_is_put_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    import export.files as files

    monkeypatch.setattr(files, "_exchange", lambda one, other: False)
    target = tmp_path / "serve"
    target.mkdir()
    (target / "old.onnx").write_text("old")
    with pytest.raises(OSError):
        files.replace_folder(tmp_path / "no-such-staging", target)
    assert sorted(p.name for p in target.iterdir()) == ["old.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve"]


def test_a_target_that_is_a_link_to_a_folder_is_replaced_by_the_new_folder(tmp_path):
    """The swap would exchange the link itself; the link is moved aside instead, as before."""
    import export.files as files

    real = tmp_path / "real"
    real.mkdir()
    (real / "old.onnx").write_text("old")
    target = tmp_path / "serve"
    target.symlink_to(real)
    staging = files.staging_folder(tmp_path, ".serve.")
    (staging / "new.onnx").write_text("new")
    files.replace_folder(staging, target)
    assert target.is_dir() and not target.is_symlink() and sorted(p.name for p in target.iterdir()) == ["new.onnx"]
    assert (real / "old.onnx").read_text() == "old"  # what the link pointed at is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "serve"]


def test_the_earlier_folder_survives_when_it_cannot_be_put_back(tmp_path, monkeypatch):
    """Both renames after the first failing: the earlier folder stays where it was moved, not deleted."""
    import export.files as files

    monkeypatch.setattr(files, "_exchange", lambda one, other: False)
    target = tmp_path / "serve"
    target.mkdir()
    (target / "old.onnx").write_text("old")
    real_replace, calls = os.replace, []

    def replace(source, destination):
        calls.append(source)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        files.replace_folder(tmp_path / "staging", target)
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".serve.old.")]
    assert (kept / "serve" / "old.onnx").read_text() == "old"


def test_weights_inside_a_branch_are_counted_as_a_models_external_data(tmp_path):
    """An If's branches may hold weights of their own: a file only a branch names is still the
    model's, so it is neither missed when copied nor taken for a stale file when replaced."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_io import external_locations, save_model

    weight = numpy_helper.from_array(np.ones((32, 32), np.float32), "w")
    branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)], [weight])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    assert external_locations(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)) == ["m.onnx.data"]
    (tmp_path / "copy.onnx").write_bytes((tmp_path / "m.onnx").read_bytes())  # names m.onnx.data in its branch
    save_model(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])),
               tmp_path / "m.onnx", external_data=False)
    assert (tmp_path / "m.onnx.data").exists()  # copy.onnx's branch still reads it


def test_a_models_skeleton_is_parsed_once_per_version_and_keeps_all_but_weight_bytes(tmp_path):
    """The readers of a model's structure share one parse of it (a model of inline weights was
    parsed whole by each); a rewritten file is parsed again, and a weight file gone since is refused."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_io import _skeleton, graph_skeleton, save_model

    table = numpy_helper.from_array(np.ones((1000, 8), np.float32), "table")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["rows"]),
                               helper.make_node("ReduceMean", ["rows", "axes"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table, axes])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    _skeleton.cache_clear()
    first = graph_skeleton(path)
    assert graph_skeleton(path) is first and _skeleton.cache_info().misses == 1
    kept = {t.name: t for t in first.graph.initializer}
    assert list(kept["table"].dims) == [1000, 8] and not kept["table"].raw_data  # 32 kB: its bytes left out
    assert numpy_helper.to_array(kept["axes"]).tolist() == [-1]  # a small constant keeps its value
    assert numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).shape == (1000, 8)  # the file is whole
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path, external_data=True)
    again = graph_skeleton(path)
    assert again is not first and [t.name for t in again.graph.initializer if t.external_data] == ["table"]
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(NormfuseError, match="external data file m.onnx.data is missing"):
        graph_skeleton(path)
