"""export.build on a folder as Optimum exports an encoder-decoder: every model built on its own,
then the pair greedy-decoded, the fused decoder reading the fused encoder's states."""
from __future__ import annotations

import json
import shutil

import pytest

from export.build import main as build_main

pytest.importorskip("transformers")

QUICK = ["--runs", "3", "--warmup", "1", "--backend", "ort-cpu"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A T5 folder with the merged decoder, and one with the decoder's two halves instead."""
    from models.hf_seq2seq import export_hf_seq2seq

    root = tmp_path_factory.mktemp("t5")
    export_hf_seq2seq(root / "all", arch="t5", halves=True)
    merged, halves = root / "merged", root / "halves"
    for folder, names in ((merged, ["decoder_model_merged.onnx"]), (halves, ["decoder_model.onnx", "decoder_with_past_model.onnx"])):
        folder.mkdir()
        for name in names + ["encoder_model.onnx", "config.json"]:
            shutil.copy(root / "all" / name, folder / name)
    return {"merged": merged, "halves": halves, "all": root / "all"}


def test_each_model_is_built_and_the_fused_pair_decodes_the_references_tokens(t5, tmp_path, capsys):
    out = tmp_path / "out"
    assert build_main(["--onnx", str(t5["merged"]), "--out", str(out), "--decode-tokens", "6",
                       "--dim", "encoder_sequence_length=6", "--triton-repo", str(tmp_path / "triton"), *QUICK]) == 0
    terminal = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = {row["model"]: row for row in report["models"]}
    assert sorted(rows) == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    # T5: 7 RMSNorms per decoder branch (two branches in the merged form), 5 in a 2-layer encoder
    assert (rows["decoder_model_merged.onnx"]["fused"], rows["encoder_model.onnx"]["fused"]) == (14, 5)
    for name, row in rows.items():
        own = json.loads((out / name.removesuffix(".onnx") / "report.json").read_text())
        assert row["exit_status"] == 0 and row["validation_passed"] and own["config"]["source"] == str(t5["merged"] / name)
        assert "ort-cpu" in row["speedup"]
    # the decoder's own build leaves decoding to the folder, and says so
    own = json.loads((out / "decoder_model_merged" / "report.json").read_text())
    assert not own["decode"] and any("folder's report" in s["reason"] for s in own["skipped"])
    (record,) = report["decode"]
    compared = record["models"]["compared"]
    assert record["backend"] == "ort-cpu" and record["new_tokens"] == 6
    assert record["encoder_inputs"] == {"input_ids": [1, 6], "attention_mask": [1, 6]}  # sized by the --dim
    assert compared["model"] == str(out / "decoder_model_merged" / "fused-cpu.onnx")
    assert compared["encoder"] == str(out / "encoder_model" / "fused-cpu.onnx")
    assert record["models"]["reference"]["encoder"] == str(t5["merged"] / "encoder_model.onnx")
    assert record["agreement"]["same_tokens"] == record["agreement"]["steps"] == 6
    assert record["agreement"]["scores_within_tolerance"]
    # the GPU stages the models' builds skipped are said once for the folder
    stages = [s["stage"] for s in report["skipped"]]
    assert len(stages) == len(set(stages)) and "ort-cuda build, validation and bench" not in stages  # not asked for
    assert (out / "report.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| `encoder_model.onnx` | 5/5" in markdown and "`decoder_model_merged/fused-cpu.onnx`" in markdown
    assert "decode on ort-cpu: 6/6 same tokens" in terminal
    # Triton batches the encoder; the merged decoder's use_cache_branch [1] rules batching out for it
    configs = {p.parent.name: p.read_text() for p in (tmp_path / "triton").glob("*/config.pbtxt")}
    assert len(configs) == 4 and "Triton does not batch requests for it (max_batch_size 0): input 'use_cache_branch' has a fixed axis 0 of 1" in terminal
    for name, text in configs.items():
        assert f"max_batch_size: {0 if name.startswith('decoder') else 8}" in text, name
    # the folder to serve in the source's place: each model's CPU form under its own name, config.json too
    serve = out / "serve-ort-cpu"
    assert sorted(p.name for p in serve.iterdir()) == ["config.json", "decoder_model_merged.onnx", "encoder_model.onnx"]
    for name in ("decoder_model_merged", "encoder_model"):
        assert (serve / f"{name}.onnx").read_bytes() == (out / name / "fused-cpu.onnx").read_bytes()
    (serving,) = report["serving"]
    assert serving["backend"] == "ort-cpu" and serving["copied"] == ["config.json"]
    assert (f"serving folder for ort-cpu: {serve} (decoder_model_merged.onnx from decoder_model_merged/fused-cpu.onnx"
            in " ".join(terminal.split()))  # as rich wrapped it
    assert "| ort-cpu | `serve-ort-cpu/` | `decoder_model_merged.onnx` (`decoder_model_merged/fused-cpu.onnx`)" in markdown


def test_the_serving_folder_carries_external_weights_and_decodes_as_the_source(t5, tmp_path, capsys):
    """Models whose weights are external data (Optimum's `<model>.onnx_data` past 2 GB) are served
    with their weight files, the source's other files go with them (hidden ones do not), and the
    folder decodes the source folder's tokens through export.decode."""
    import onnx

    from export.decode import main as decode_main

    source = tmp_path / "t5"
    source.mkdir()
    for name in ("decoder_model_merged.onnx", "encoder_model.onnx"):
        onnx.save_model(onnx.load(t5["merged"] / name), source / name, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=name + "_data", size_threshold=1024)
    shutil.copy(t5["merged"] / "config.json", source / "config.json")
    (source / "generation_config.json").write_text("{}\n")
    (source / ".lock").write_text("")
    out = tmp_path / "out"
    assert build_main(["--onnx", str(source), "--out", str(out), "--decode-tokens", "3", *QUICK]) == 0
    serve = out / "serve-ort-cpu"
    assert sorted(p.name for p in serve.iterdir()) == [
        "config.json", "decoder_model_merged.onnx", "decoder_model_merged.onnx_data", "encoder_model.onnx",
        "encoder_model.onnx_data", "generation_config.json"]
    assert (serve / "encoder_model.onnx_data").read_bytes() == (source / "encoder_model.onnx_data").read_bytes()
    decoded = tmp_path / "decode.json"
    assert decode_main([str(source), "--compare", str(serve), "--tokens", "5", "--prompt", "6", "--json", str(decoded)]) == 0
    record = json.loads(decoded.read_text())
    assert record["models"]["compared"]["encoder"] == str(serve / "encoder_model.onnx")
    assert record["agreement"]["same_tokens"] == record["agreement"]["steps"] == 5
    # written again (as a build into the same --out does): replaced whole, nothing of the last one left beside it
    from pathlib import Path

    from export.serving_folder import write_serving_folder

    (serve / "stale.txt").write_text("")
    (serving,) = json.loads((out / "report.json").read_text())["serving"]
    write_serving_folder(source, {name: Path(form) for name, form in serving["models"].items()}, serve)
    assert not (serve / "stale.txt").exists() and (serve / "encoder_model.onnx_data").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_halves_are_built_each_with_its_own_dims_and_decoded_as_one_decoder(t5, tmp_path):
    """--dim sizes the models that have the name (the encoder has no cache axis); a folder with the
    decoder's two halves and no merged form decodes them as one decoder, the fused halves (each
    built in a folder of its own) reading the fused encoder's states."""
    out = tmp_path / "out"
    assert build_main(["--onnx", str(t5["halves"]), "--out", str(out), "--dim", "past_decoder_sequence_length=3",
                       "--decode-tokens", "5", *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["model"] for row in report["models"]] == ["decoder_model.onnx", "decoder_with_past_model.onnx",
                                                          "encoder_model.onnx"]
    dims = {name: json.loads((out / name / "report.json").read_text())["config"]["dims"]
            for name in ("decoder_with_past_model", "encoder_model")}
    assert dims == {"decoder_with_past_model": {"past_decoder_sequence_length": 3}, "encoder_model": {}}
    (record,) = report["decode"]
    assert record["models"]["compared"]["model"] == (f"{out / 'decoder_model' / 'fused-cpu.onnx'} + "
                                                     f"{out / 'decoder_with_past_model' / 'fused-cpu.onnx'}")
    assert record["models"]["reference"]["model"] == str(t5["halves"])
    assert record["agreement"]["same_tokens"] == record["agreement"]["steps"] == 5
    assert "`decoder_model/fused-cpu.onnx + decoder_with_past_model/fused-cpu.onnx`" in (out / "report.md").read_text()
    # served as the source has them: both halves, each in its CPU form
    assert sorted(p.name for p in (out / "serve-ort-cpu").iterdir()) == [
        "config.json", "decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx"]
    assert ((out / "serve-ort-cpu" / "decoder_with_past_model.onnx").read_bytes()
            == (out / "decoder_with_past_model" / "fused-cpu.onnx").read_bytes())


def test_a_dim_no_model_has_is_a_one_line_error_before_any_work(t5, tmp_path, capsys):
    code = build_main(["--onnx", str(t5["merged"]), "--out", str(tmp_path / "out"), "--dim", "nope=3", *QUICK])
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "--dim nope: no model in the folder has a dimension of that name" in stderr
    assert "encoder_sequence_length" in stderr and not (tmp_path / "out").exists()


def test_a_model_that_fails_validation_fails_the_folder(t5, tmp_path, monkeypatch, capsys):
    """Held to 1e-12, every fused graph differs from its reference: exit 1, the failing
    models named, and the folder's report still written (for Optimum's full layout, whose merged
    decoder's halves are left out)."""
    from normops import GRAPH, Tolerance

    monkeypatch.setitem(GRAPH, "float32", Tolerance(atol=1e-12, rtol=0.0))
    out = tmp_path / "out"
    (out / "serve-ort-cpu").mkdir(parents=True)  # as an earlier, passing build left it
    (out / "serve-ort-cpu" / "encoder_model.onnx").write_bytes(b"")
    assert build_main(["--onnx", str(t5["all"]), "--out", str(out), "--decode-tokens", "0", *QUICK]) == 1
    report = json.loads((out / "report.json").read_text())
    assert [row["exit_status"] for row in report["models"]] == [1, 1]
    # Optimum's full layout: the merged decoder's two halves are not built again
    assert [row["model"] for row in report["models"]] == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    assert report["skipped"][0]["stage"] == "build of decoder_model.onnx and decoder_with_past_model.onnx"
    assert "FAILED: decoder_model_merged.onnx, encoder_model.onnx" in capsys.readouterr().out
    # nothing put up to be served: the reason is in the report
    assert report["serving"] == [] and not (out / "serve-ort-cpu").exists()
    (reason,) = [s["reason"] for s in report["skipped"] if s["stage"] == "ort-cpu serving folder serve-ort-cpu"]
    assert reason.startswith("decoder_model_merged.onnx, encoder_model.onnx failed")
    assert reason.endswith("(the earlier serve-ort-cpu/ was removed)")


def test_a_pair_that_could_not_be_decoded_is_not_put_up_to_be_served(t5, tmp_path):
    """A merged decoder with an input export.decode cannot feed (here an unused cache_position):
    each model builds and passes, but the fused pair's tokens were never checked, so no serving
    folder stands for it, and the report says why."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "t5"
    shutil.copytree(t5["merged"], folder)
    decoder = onnx.load(str(folder / "decoder_model_merged.onnx"))
    decoder.graph.input.append(helper.make_tensor_value_info("cache_position", TensorProto.INT64, ["sequence"]))
    onnx.save(decoder, str(folder / "decoder_model_merged.onnx"))
    out = tmp_path / "out"
    assert build_main(["--onnx", str(folder), "--out", str(out), "--decode-tokens", "4", "--triton-repo",
                       str(tmp_path / "triton"), *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["serving"] == [] and not (out / "serve-ort-cpu").exists()
    (reason,) = [s["reason"] for s in report["skipped"] if s["stage"] == "ort-cpu serving folder serve-ort-cpu"]
    assert reason.startswith("the encoder-decoder pair could not be decoded, so the fused pair is unchecked (")
    assert "cache_position" in reason
    # nor are the fused models put up in the Triton repository: each passed alone, the pair is unchecked
    entries = sorted(p.name for p in (tmp_path / "triton").iterdir())
    assert entries and all("_reference_" in name for name in entries), entries
    withdrawn = [s["stage"] for s in report["skipped"] if s["stage"].startswith("Triton model ")]
    assert len(withdrawn) == 2 and all("_fused_" in stage for stage in withdrawn)


def test_a_model_that_cannot_be_built_is_named_and_the_others_are_built(tmp_path, capsys):
    """One model of the folder cannot take the bench shape (it reshapes its input to 1x16x16): it is
    reported with its one-line error and the exit status is 1, while the other is built as usual."""
    import onnx
    from onnx import TensorProto, helper
    from test_rewrite_keepdims import ints, restored_rms

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(restored_rms(), folder / "good.onnx")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "fixed"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[ints("fixed", [1, 16, 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "bad.onnx")
    out = tmp_path / "out"
    assert build_main(["--onnx", str(folder), "--out", str(out), *QUICK]) == 1
    report = json.loads((out / "report.json").read_text())
    rows = {row["model"]: row for row in report["models"]}
    assert rows["good.onnx"]["exit_status"] == 0 and rows["good.onnx"]["fused"] == 1
    assert rows["bad.onnx"]["exit_status"] == 1 and "ONNX Runtime failed to run it" in rows["bad.onnx"]["error"]
    assert "| `bad.onnx` | **not built**:" in (out / "report.md").read_text()
    assert "FAILED: bad.onnx" in capsys.readouterr().out


def native_layernorm_model():
    """x -> LayerNormalization: a single op already, which the CPU form leaves as it is."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    gamma, beta = (onnx.numpy_helper.from_array(np.full(16, v, np.float32), n) for n, v in (("g", 1.5), ("b", 0.25)))
    graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)], "native",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
                              initializer=[gamma, beta])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_serving_folder_that_cannot_be_written_fails_the_build_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A full disk while the folder is filled: the models' builds stand, the folder's report says
    why there is no serving folder, nothing half-written is left, and the exit status is 1."""
    import errno

    import onnx
    from test_rewrite_keepdims import restored_rms

    import export.serving_folder

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(restored_rms(), folder / "hand.onnx")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.serving_folder.shutil, "copy2", full_disk)
    out = tmp_path / "out"
    assert build_main(["--onnx", str(folder), "--out", str(out), *QUICK]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["serving"] == [] and report["models"][0]["exit_status"] == 0
    (reason,) = [s["reason"] for s in report["skipped"] if s["stage"] == "ort-cpu serving folder serve-ort-cpu"]
    assert reason == f"{out / 'serve-ort-cpu'}: cannot write (No space left on device)"
    assert sorted(p.name for p in out.iterdir()) == ["hand", "report.json", "report.md"]
    assert "ort-cpu serving folder not written" in capsys.readouterr().out


def test_a_model_the_rewrite_leaves_as_it_is_is_served_as_given(tmp_path, capsys):
    """A model whose CPU form is the model itself is served as given, beside one that was fused;
    a folder where the rewrite changed nothing for the CPU gets no serving folder, and says why."""
    import onnx
    from test_rewrite_keepdims import restored_rms

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(restored_rms(), folder / "hand.onnx")
    onnx.save(native_layernorm_model(), folder / "native.onnx")
    out = tmp_path / "out"
    assert build_main(["--onnx", str(folder), "--out", str(out), *QUICK]) == 0
    (serving,) = json.loads((out / "report.json").read_text())["serving"]
    assert serving["models"] == {"hand.onnx": str(out / "hand" / "fused-cpu.onnx"), "native.onnx": str(folder / "native.onnx")}
    assert (out / "serve-ort-cpu" / "native.onnx").read_bytes() == (folder / "native.onnx").read_bytes()
    assert "`hand.onnx` (`hand/fused-cpu.onnx`)<br>`native.onnx` (as given)" in (out / "report.md").read_text()

    (folder / "hand.onnx").unlink()
    out = tmp_path / "unchanged"
    assert build_main(["--onnx", str(folder), "--out", str(out), *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["serving"] == [] and not (out / "serve-ort-cpu").exists()
    assert {"stage": "ort-cpu serving folder serve-ort-cpu",
            "reason": "the rewrite changed no model for it: serve the source folder as it is"} in report["skipped"]


def test_excluded_norms_are_left_in_the_models_that_have_them(t5, tmp_path, capsys):
    """--exclude goes to every model: the encoder's last norm (ending at last_hidden_state) stays as
    written there, the decoder keeps all its fusions; a name no model has is a one-line error (2)
    before any model is built."""
    refused = tmp_path / "refused"
    assert build_main(["--onnx", str(t5["merged"]), "--out", str(refused), "--decode-tokens", "0", "--exclude",
                       "last_hidden_state", "--exclude", "nowhere", *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normfuse: error: --exclude nowhere: no norm that would be fused ends at a tensor of that "
                          "name in ") and len(err.splitlines()) == 1
    assert not refused.exists()
    out = tmp_path / "out"
    assert build_main(["--onnx", str(t5["merged"]), "--out", str(out), "--decode-tokens", "0", "--exclude",
                       "last_hidden_state", *QUICK]) == 0
    rows = {row["model"]: row for row in json.loads((out / "report.json").read_text())["models"]}
    assert (rows["encoder_model.onnx"]["fused"], rows["decoder_model_merged.onnx"]["fused"]) == (4, 14)
    encoder = json.loads((out / "encoder_model" / "report.json").read_text())["rewrite"]["tensorrt"]
    assert [e["output"] for e in encoder["excluded"]] == ["last_hidden_state"]


def test_a_backend_that_cannot_run_here_is_one_line_before_any_model(t5, tmp_path, capsys):
    from export.backends import availability

    if availability("ort-cuda").present:
        pytest.skip("ONNX Runtime's CUDA provider runs here")
    out = tmp_path / "out"
    assert build_main(["--onnx", str(t5["merged"]), "--out", str(out), "--backend", "ort-cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("normfuse: error: --backend ort-cuda cannot run here") and len(err.splitlines()) == 1
    assert not out.exists()


def test_forms_whose_weight_files_share_a_name_are_served_each_with_its_own(tmp_path):
    """Every model's built form is `fused-cpu.onnx`, and past 1 GiB its weights go to
    `fused-cpu.onnx.data`: served together, each model's weights are named after it. Two models
    naming one weight file of their own that differ are a one-line error, and no folder is written."""
    import numpy as np
    import onnx

    from export.errors import NormfuseError
    from export.onnx_io import rename_location, save_model
    from export.runtime import load
    from export.serving_folder import write_serving_folder

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}\n")
    forms, feeds, expected = {}, {"x": np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)}, {}
    for name, gamma in (("encoder_model.onnx", 1.5), ("decoder_model.onnx", 0.5)):
        model = native_layernorm_model()
        model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.full(16, gamma, np.float32), "g"))
        model.graph.initializer.extend([onnx.numpy_helper.from_array(np.full(512, gamma, np.float32), "unused")])
        onnx.save(model, source / name)
        built = tmp_path / name.removesuffix(".onnx") / "fused-cpu.onnx"
        save_model(model, built, external_data=True)
        assert (built.parent / "fused-cpu.onnx.data").is_file()
        forms[name] = built
        expected[name] = load(built).run(feeds)["y"]
    served = tmp_path / "serve-ort-cpu"
    record = write_serving_folder(source, forms, served)
    assert sorted(p.name for p in served.iterdir()) == ["config.json", "decoder_model.onnx", "decoder_model.onnx.data",
                                                        "encoder_model.onnx", "encoder_model.onnx.data"]
    assert record["copied"] == ["config.json"]
    for name in forms:
        np.testing.assert_array_equal(load(served / name).run(feeds)["y"], expected[name])

    # two models naming one file of their own, with other bytes: refused, nothing written
    for name, form in forms.items():
        model = onnx.load(str(form), load_external_data=False)
        rename_location(model, "fused-cpu.onnx.data", "weights.bin")
        onnx.save(model, str(form))
        (form.parent / "fused-cpu.onnx.data").rename(form.parent / "weights.bin")
    with pytest.raises(NormfuseError, match=r"fused-cpu.onnx: its external data weights.bin and another model's, both "
                                            r"to be .*/other/weights.bin, differ"):
        write_serving_folder(source, forms, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir() if "other" in p.name) == []
