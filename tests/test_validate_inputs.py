"""Validation of models fed token ids: integer inputs stay inside the table they index, the
tolerance follows the floating output, and the command line takes such a model end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.backends import index_bounds, random_arrays
from export.errors import NormfuseError
from export.rewrite import rewrite_file
from export.rewrite.synth import plain_rms_constants, plain_rms_nodes
from export.triton_repo import onnx_signature
from export.validate import main, model_dtype

VOCAB, HIDDEN = 37, 16


def token_model(path, mask: bool = True, elem=TensorProto.FLOAT):
    """ids -> Gather(embedding) -> RMSNorm spelled out (-> * mask) -> y."""
    rng = np.random.default_rng(0)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np_dtype), "embedding"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np_dtype), "eps"),
             numpy_helper.from_array(np.array(2.0, np_dtype), "two"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np_dtype), "gamma")]
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["x"]),
             helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["n"]),
             helper.make_node("Mul", ["n", "gamma"], ["y0" if mask else "y"])]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])]
    if mask:
        nodes += [helper.make_node("Unsqueeze", ["mask", "axes"], ["m1"]),
                  helper.make_node("Cast", ["m1"], ["mf"], to=elem),
                  helper.make_node("Mul", ["y0", "mf"], ["y"])]
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence"]))
    graph = helper.make_graph(nodes, "tokens", inputs, [helper.make_tensor_value_info("y", elem, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_token_ids_stay_inside_the_embedding_table(tmp_path):
    path = token_model(tmp_path / "m.onnx")
    assert index_bounds(path) == {"ids": VOCAB}  # the mask indexes nothing
    inputs, _ = onnx_signature(path)
    feeds = random_arrays(inputs, 4, 64, seed=1, bounds=index_bounds(path))
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (4, 64)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() == VOCAB - 1  # the whole table, nothing past it
    assert set(np.unique(feeds["mask"])) == {1}  # an attention mask of whole sequences, as served


@pytest.mark.parametrize("to,bounded", [(TensorProto.INT32, True), (TensorProto.FLOAT, False)])
def test_ids_reshaped_or_cast_to_integers_still_index_the_table(tmp_path, to, bounded):
    """GPT-2 views input_ids as [-1, length] before its embedding: still the ids. A cast to float
    makes them something else."""
    model = onnx.load(str(token_model(tmp_path / "m.onnx", mask=False)))
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 4], np.int64), "view"))
    graph.node[0].input[1] = "ids_cast"
    graph.node.insert(0, helper.make_node("Cast", ["ids_view"], ["ids_cast"], to=to))
    graph.node.insert(0, helper.make_node("Reshape", ["ids", "view"], ["ids_view"]))
    onnx.save(model, str(tmp_path / "viewed.onnx"))
    assert index_bounds(tmp_path / "viewed.onnx") == ({"ids": VOCAB} if bounded else {})


def test_float_feeds_are_what_they_were():
    """Models fed hidden states (normfuse's own stacks) get the same seeded arrays as before."""
    class Spec:
        name, dtype, shape = "hidden_states", "float32", [None, None, 8]

    got = random_arrays([Spec()], 2, 3, seed=0)["hidden_states"]
    np.testing.assert_array_equal(got, np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32))


@pytest.mark.parametrize("elem,dtype", [(TensorProto.FLOAT, "float32"), (TensorProto.FLOAT16, "float16")])
def test_the_tolerance_follows_the_floating_output(tmp_path, elem, dtype):
    assert model_dtype(token_model(tmp_path / "m.onnx", elem=elem)) == dtype


def test_the_tolerance_follows_the_least_precise_type_inside(tmp_path):
    """fp32 in and out with fp16 or bf16 weights or casts inside: the inside type's tolerance."""
    from export.validate import model_dtypes

    path = token_model(tmp_path / "m.onnx", elem=TensorProto.FLOAT)
    assert model_dtypes(path) == ("float32", "float32")
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("Cast", ["y"], ["y_half"], to=TensorProto.BFLOAT16))
    onnx.save(model, str(path))
    assert model_dtypes(path) == ("float32", "bfloat16")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float16), "half"))
    onnx.save(model, str(path))
    assert model_dtypes(path) == ("float32", "bfloat16") and model_dtype(path) == "bfloat16"  # the least precise


def test_a_model_with_nothing_floating_is_a_clear_error(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "ints",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, [2])])
    path = tmp_path / "ints.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(NormfuseError, match="no floating-point input or output"):
        model_dtype(path)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_validate_command_on_a_token_model(tmp_path, capsys, target):
    reference = token_model(tmp_path / "ref.onnx")
    fused = tmp_path / f"fused-{target}.onnx"
    assert rewrite_file(reference, fused, target=target).counts == {"RMSNorm": 1}
    backend = "ort-cpu" if target == "onnxruntime" else "onnx-reference"
    assert main([str(reference), str(fused), "--backend", backend, "--shapes", "1x16,3x40"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "float32" in out


def test_a_token_onnx_runtime_refuses_is_a_one_line_error_naming_the_model_and_input(tmp_path, capfd):
    from export.runtime import load

    path = token_model(tmp_path / "m.onnx")
    model = load(path, providers=["CPUExecutionProvider"])
    ids = np.full((1, 5), VOCAB + 3, dtype=np.int64)  # past the embedding table
    with pytest.raises(NormfuseError) as exc:
        model.run({"ids": ids, "mask": np.ones((1, 5), np.int64)})
    assert str(exc.value).startswith(f"{path}: input 'ids' holds {VOCAB + 3} at [0, 0], outside the {VOCAB} rows of "
                                     f"the table it indexes (0..{VOCAB - 1}) (ONNX Runtime: ")
    assert "onnxruntime" not in capfd.readouterr().err  # ONNX Runtime's own log line is not printed as well


def test_validate_on_given_inputs_npz_and_polygraphy(tmp_path, capsys):
    """--inputs: the comparison runs on inputs of one's own (a decoder's cache and mask must agree
    in length, which random inputs cannot know); a .npz, or the Polygraphy inputs file that
    --save-outputs writes, so a run can be repeated on the very same inputs."""
    reference = token_model(tmp_path / "ref.onnx")
    fused = tmp_path / "fused.onnx"
    rewrite_file(reference, fused, target="onnxruntime")
    given = tmp_path / "in.npz"
    np.savez(given, ids=(np.arange(14, dtype=np.int64).reshape(2, 7) * 5) % VOCAB, mask=np.ones((2, 7), np.int64))
    assert main([str(reference), str(fused), "--inputs", str(given), "--save-outputs", str(tmp_path / "po")]) == 0
    first = capsys.readouterr().out
    assert first.count("PASS 2x7 y") == 1  # the given shape, not --shapes' defaults
    assert main([str(reference), str(fused), "--inputs", str(tmp_path / "po" / "inputs.json")]) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[0] == first.splitlines()[0]  # the same inputs give the same figures


@pytest.mark.parametrize("content,message", [
    ({"idz": np.zeros((2, 3), np.int64)}, "'idz' is not an input of the model"),
    ({"ids": np.zeros((2, 3), np.int32), "mask": np.ones((2, 3), np.int64)}, "'ids' has dtype int32"),
    ({"ids": np.zeros((6,), np.int64), "mask": np.ones((2, 3), np.int64)}, "'ids' has rank 1"),
])
def test_given_inputs_that_do_not_fit_are_one_line_errors(tmp_path, capsys, content, message):
    reference = token_model(tmp_path / "ref.onnx")
    given = tmp_path / "in.npz"
    np.savez(given, **content)
    assert main([str(reference), str(reference), "--inputs", str(given)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_json_that_is_no_inputs_file_is_a_one_line_error(tmp_path, capsys):
    reference = token_model(tmp_path / "ref.onnx")
    bad = tmp_path / "in.json"
    bad.write_text('{"not": "a list"}')
    assert main([str(reference), str(reference), "--inputs", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a Polygraphy inputs file" in err and len(err.splitlines()) == 1


def cache_model(path):
    """A decoder-like step: [past; x] along the sequence, times a mask as long as both, then a
    LayerNorm. The mask's length must be past + new tokens: random inputs cannot know that."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Concat", ["past", "x"], ["all"], axis=1),
             helper.make_node("Unsqueeze", ["mask", "axes"], ["m1"]),
             helper.make_node("Cast", ["m1"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["all", "mf"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), "gamma"),
             numpy_helper.from_array((0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), "beta")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "new", HIDDEN]),
              helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", "past", HIDDEN]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "total"])]
    graph = helper.make_graph(nodes, "cache", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_decoder_step_validates_on_given_inputs_only(tmp_path, capsys):
    reference = cache_model(tmp_path / "ref.onnx")
    fused = tmp_path / "fused.onnx"
    assert rewrite_file(reference, fused, target="tensorrt").counts == {"LayerNorm": 1}  # the Add broadcasts
    assert main([str(reference), str(fused), "--backend", "onnx-reference"]) == 1  # random: lengths disagree
    capsys.readouterr()
    given = tmp_path / "step.npz"
    rng = np.random.default_rng(1)
    np.savez(given, x=rng.standard_normal((2, 1, HIDDEN)).astype(np.float32),
             past=rng.standard_normal((2, 6, HIDDEN)).astype(np.float32), mask=np.ones((2, 7), np.int64))
    assert main([str(reference), str(fused), "--backend", "onnx-reference", "--inputs", str(given)]) == 0
    assert "PASS 2x1 y" in capsys.readouterr().out


def branch_model(path, else_op: str = "Identity"):
    """`use_cache_branch` ([1] bool, as Optimum's merged decoders have it) chooses between the
    RMSNorm of x (then) and `else_op` of x (else)."""
    hidden = 8
    then_nodes = plain_rms_nodes("x", "y_then")
    shape = ["batch", "seq", hidden]
    branches = {
        "then_branch": helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, shape)]),
        "else_branch": helper.make_graph([helper.make_node(else_op, ["x"], ["y_else"])], "else", [],
                                         [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, shape)])}
    cond = helper.make_node("Squeeze", ["use_cache_branch"], ["cond"])
    graph = helper.make_graph(
        [cond, helper.make_node("If", ["cond"], ["y"], **branches)], "g",
        [helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        plain_rms_constants(hidden))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_both_branches_of_a_switch_input_are_validated(tmp_path):
    """A boolean input an If reads (here through a Squeeze, as the condition is a scalar) runs
    true and false for every shape: a candidate that differs only in the else branch fails."""
    from export.validate import Side, branch_switches, compare

    reference = branch_model(tmp_path / "ref.onnx")
    assert branch_switches(onnx.load(str(reference)).graph) == ["use_cache_branch"]
    fused = tmp_path / "fused.onnx"
    assert rewrite_file(reference, fused, target="onnxruntime").counts == {"RMSNorm": 1}
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(fused, "ort-cpu", "fused"), [(1, 4), (2, 3)], "float32")
    assert [(p["shape"], p["switches"]) for p in pairs] == [
        ([1, 4], {"use_cache_branch": True}), ([1, 4], {"use_cache_branch": False}),
        ([2, 3], {"use_cache_branch": True}), ([2, 3], {"use_cache_branch": False})]
    assert all(p["passed"] for p in pairs)
    wrong_else = branch_model(tmp_path / "wrong.onnx", else_op="Neg")
    pairs = compare(Side(reference, "ort-cpu", "reference"), Side(wrong_else, "ort-cpu", "fused"), [(1, 4)], "float32")
    assert [p["passed"] for p in pairs] == [True, False]


def test_bench_node_counts_include_the_branches(tmp_path):
    """A merged decoder is one If at the top: its node count is that of everything it runs."""
    from export.bench import node_count

    assert node_count(branch_model(tmp_path / "m.onnx")) == 2 + 6 + 1  # Squeeze and If, then, else


@pytest.mark.parametrize("backend", ["ort-cpu", "onnx-reference"])
def test_one_model_is_loaded_at_a_time(tmp_path, monkeypatch, backend):
    """The reference runs every shape and is let go before the candidate loads, so validating a
    model needs its memory once, not twice."""
    import gc
    import weakref

    from export import validate

    reference = token_model(tmp_path / "ref.onnx")
    fused = tmp_path / "fused.onnx"
    rewrite_file(reference, fused, target="onnxruntime" if backend == "ort-cpu" else "tensorrt")
    events, real_make_runner = [], validate.make_runner

    def recorded(path, *args, **kwargs):
        events.append(f"load {path.name if hasattr(path, 'name') else path}")
        runner = real_make_runner(path, *args, **kwargs)
        weakref.finalize(runner, events.append, f"free {getattr(path, 'name', path)}")
        return runner

    monkeypatch.setattr(validate, "make_runner", recorded)
    pairs = validate.compare(validate.Side(reference, backend, "reference"), validate.Side(fused, backend, "fused"),
                             [(1, 16), (2, 8)], "float32")
    gc.collect()
    assert [p["passed"] for p in pairs] == [True, True]
    assert events == ["load ref.onnx", "free ref.onnx", "load fused.onnx", "free fused.onnx"]


def test_the_reference_evaluator_holds_each_weight_once(tmp_path):
    """onnx's evaluator keeps the model it is given and copies every initializer into numpy: the
    runner reads the weights once (external data too) and feeds them as inputs instead."""
    from export.backends import ReferenceRunner
    from export.rewrite.evaluate import run_model

    reference = token_model(tmp_path / "inline.onnx")
    model = onnx.load(str(reference))
    feeds = {"ids": np.array([[1, 5, 36]]), "mask": np.ones((1, 3), np.int64)}
    expected = run_model(model, feeds)[0]
    names = sorted(t.name for t in model.graph.initializer)
    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    onnx.save(model, str(split), save_as_external_data=True, location="w.bin", size_threshold=0)
    for path in (reference, split):
        runner = ReferenceRunner(path)
        assert not runner.evaluator.proto_.graph.initializer
        assert sorted(runner.weights) == names
        np.testing.assert_array_equal(runner.run(feeds)["y"], expected)


def test_an_initializer_that_is_also_an_input_is_overridden_by_the_feeds(tmp_path):
    from export.backends import ReferenceRunner

    model = onnx.load(str(token_model(tmp_path / "m.onnx", mask=False)))
    gamma = next(t for t in model.graph.initializer if t.name == "gamma")
    model.graph.input.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [HIDDEN]))
    onnx.save(model, str(tmp_path / "overridable.onnx"))
    runner = ReferenceRunner(tmp_path / "overridable.onnx")
    ids = np.array([[3, 4]])
    as_stored = runner.run({"ids": ids})["y"]
    doubled = runner.run({"ids": ids, "gamma": 2 * numpy_helper.to_array(gamma)})["y"]
    np.testing.assert_allclose(doubled, 2 * as_stored, rtol=1e-6)


def test_missing_external_weights_are_a_one_line_error(tmp_path):
    from export.backends import ReferenceRunner

    path = tmp_path / "model.onnx"
    onnx.save(onnx.load(str(token_model(tmp_path / "m.onnx"))), str(path), save_as_external_data=True,
              location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(NormfuseError, match="external data of tensor .* cannot be read"):
        ReferenceRunner(path)
