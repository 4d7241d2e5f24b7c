"""Serving a fused decoder inside a generation loop (export.decode): greedy decoding with a KV
cache on real ONNX Runtime sessions gives the tokens transformers' own `generate` gives, and the
fused decoder, fed the same tokens, chooses the same ones with scores within tolerance."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_pipeline import _main

from export.decode import Generation, agreement, decode, decoded_alike, decoder_of, generate
from export.errors import NormfuseError, UsageError
from export.rewrite import rewrite_file
from export.runtime import load
from models.hf_decoder import export_hf_decoder

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder")
    reference, fused = folder / "decoder.onnx", folder / "decoder-fused-cpu.onnx"
    model = export_hf_decoder(reference)
    report = rewrite_file(reference, fused, target="onnxruntime", residual=False)
    assert report.fused == 5
    return {"reference": reference, "fused": fused, "torch": model}


def test_greedy_tokens_are_transformers_own(decoders):
    record = decode(decoders["reference"], prompt=6, tokens=10, batch=2, seed=3, warmup=0,
                    providers=["CPUExecutionProvider"])
    prompt = torch.tensor(record["prompt"])
    expected = decoders["torch"].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                          do_sample=False, pad_token_id=0)[:, 6:]
    ours = np.asarray(record["models"]["reference"]["tokens"]).T  # steps x batch -> batch x steps
    np.testing.assert_array_equal(ours, expected.numpy())


def test_step_curves_are_medians_over_rounds():
    from export.decode_report import step_curves

    record = {"models": {"reference": {"raw_step_ms": [[1.0, 5.0], [3.0, 1.0], [2.0, 2.0]]},
                         "compared": {"raw_step_ms": [[4.0, 4.0]]}}}
    assert step_curves(record) == {"reference": [2.0, 2.0], "compared": [4.0, 4.0]}


def test_prompts_of_different_lengths_share_a_batch(decoders, tmp_path, capsys):
    """Prompts of 6, 3 and 5 tokens, padded on the left and masked, decode as transformers' generate
    decodes the same padded batch; the fused decoder chooses the same tokens."""
    from export.decode import main

    assert main([str(decoders["reference"]), "--compare", str(decoders["fused"]), "--prompt", "6,3,5", "--tokens", "8",
                 "--warmup", "0", "--providers", "CPUExecutionProvider", "--json", str(tmp_path / "d.json")]) == 0
    assert "prompts 6/3/5" in capsys.readouterr().out
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["batch"] == 3 and record["prompt_lengths"] == [6, 3, 5]
    assert [len(p) for p in record["prompt"]] == [6, 3, 5] and record["agreement"]["same_tokens"] == 8
    padded = torch.zeros((3, 6), dtype=torch.int64)
    mask = torch.zeros((3, 6), dtype=torch.int64)
    for row, tokens in enumerate(record["prompt"]):
        padded[row, 6 - len(tokens):] = torch.tensor(tokens)
        mask[row, 6 - len(tokens):] = 1
    expected = decoders["torch"].generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                          pad_token_id=0)[:, 6:]
    ours = np.asarray(record["models"]["reference"]["tokens"]).T
    np.testing.assert_array_equal(ours, expected.numpy())
    # the padded sequence decodes as it does alone
    from export.decode import generate

    model = load(decoders["reference"], providers=["CPUExecutionProvider"])
    alone = generate(model, decoder_of(model, "m"), np.asarray([record["prompt"][1]]), 8)
    assert [step[0] for step in alone.tokens] == list(ours[1])
    code, stderr = _main("export.decode", str(decoders["reference"]), "--prompt", "6,3", "--batch", "3", capsys=capsys)
    assert code == 2 and "2 prompt lengths for a batch of 3" in stderr


def test_the_fused_decoder_chooses_the_same_tokens(decoders, tmp_path, capsys):
    from export.decode import main

    assert main([str(decoders["reference"]), "--compare", str(decoders["fused"]), "--prompt", "5", "--tokens", "12",
                 "--providers", "CPUExecutionProvider", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "compared: same: the same tokens at 12/12 steps" in out and "decode step p50" in out
    record = json.loads((tmp_path / "d.json").read_text())
    agree = record["agreement"]
    assert agree["steps"] == agree["same_tokens"] == 12 and agree["scores_within_tolerance"]
    for run in record["models"].values():
        assert [len(steps) for steps in run["raw_step_ms"]] == [11]
        assert run["prefill_ms"] > 0 and run["decode_tokens_per_s"] > 0
    assert record["models"]["compared"]["tokens"] == record["models"]["reference"]["tokens"]
    assert record["cache"] == "host" and record["rounds"] == 1  # the CPU provider's numpy costs no copy


def test_the_kept_cache_decodes_as_the_host_copied_one(decoders):
    """The cache fed back as ONNX Runtime's own values gives the scores the copied one gives, bit
    for bit, and the caches kept are OrtValues, not numpy copies."""
    from export.decode import generate

    model = load(decoders["reference"], providers=["CPUExecutionProvider"])
    decoder = decoder_of(model, "m")
    prompt = np.random.default_rng(0).integers(0, 100, size=(2, 5))
    kept, copied = (generate(model, decoder, prompt, 6, cache_way=way) for way in ("kept", "host"))
    assert kept.tokens == copied.tokens
    for a, b in zip(kept.step_logits, copied.step_logits):
        np.testing.assert_array_equal(a, b)
    feeds = {"input_ids": prompt, "attention_mask": np.ones((2, 5), np.int64),
             "position_ids": np.tile(np.arange(5), (2, 1)),
             **{past: np.zeros((2, 2, 0, 16), np.float32) for past, _ in decoder.cache}}
    outputs, cache = model.run_keeping(feeds, "present.0.key")  # one name as a string
    assert set(outputs) == set(model.output_names) - {"present.0.key"}
    assert type(cache["present.0.key"]).__name__ == "OrtValue" and cache["present.0.key"].shape() == [2, 2, 5, 16]
    with pytest.raises(UsageError, match="cache 'gpu': choose from auto, kept, host"):
        generate(model, decoder, prompt, 2, cache_way="gpu")
    with pytest.raises(NormfuseError, match="'present.9.key' is not an output of the model"):
        model.run_keeping(feeds, ["present.9.key"])
    # a kept value goes back in, and is checked like an array; lengths that do not agree fail by name
    feeds = {**feeds, "past_key_values.0.key": cache["present.0.key"], "past_key_values.0.value": cache["present.0.key"]}
    with pytest.raises(NormfuseError, match=r"ONNX Runtime failed to run it on .*past_key_values.0.key \[2, 2, 5, 16\]"):
        model.run_keeping(feeds, [])
    feeds = {**feeds, "past_key_values.1.key": np.zeros((2, 2, 5, 16), np.float32),
             "past_key_values.1.value": np.zeros((2, 2, 5, 16), np.float32),
             "attention_mask": np.ones((2, 10), np.int64), "position_ids": np.tile(np.arange(5, 10), (2, 1))}
    assert model.run_keeping(feeds, [])[0]["logits"].shape == (2, 5, 100)
    bad = {**feeds, "past_key_values.1.key": model.run_keeping(feeds, ["logits"])[1]["logits"]}
    with pytest.raises(NormfuseError, match=r"input 'past_key_values.1.key' has rank 3 \(shape \[2, 5, 100\]\)"):
        model.run_keeping(bad, [])


def test_rounds_take_turns_and_pool_the_steps(decoders, tmp_path, capsys):
    from export.decode import main

    assert main([str(decoders["reference"]), "--compare", str(decoders["fused"]), "--prompt", "3", "--tokens", "4",
                 "--rounds", "3", "--warmup", "0", "--cache", "kept", "--providers", "CPUExecutionProvider",
                 "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "steps.png")]) == 0
    assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["rounds"] == 3 and record["cache"] == "kept"
    for run in record["models"].values():
        assert [len(steps) for steps in run["raw_step_ms"]] == [3, 3, 3]
    assert record["agreement"]["same_tokens"] == 4
    said = []
    decode(decoders["reference"], decoders["fused"], prompt=2, tokens=2, rounds=2, providers=["CPUExecutionProvider"],
           progress=said.append)
    assert said == ["warm-up 1/1, reference", "warm-up 1/1, compared", "round 1/2, reference", "round 1/2, compared",
                    "round 2/2, compared", "round 2/2, reference", "the reference as written, for the scores"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(decoders["reference"]), "--rounds", "0"])
    assert exit_.value.code == 2 and "argument --rounds: '0' must be at least 1" in capsys.readouterr().err


def test_a_different_decoder_is_caught(decoders, tmp_path, capsys):
    """A decoder whose weights differ (another seed) does not pass as the same model: exit 1."""
    other = tmp_path / "other.onnx"
    export_hf_decoder(other, seed=1)
    code, _ = _main("export.decode", str(decoders["reference"]), "--compare", str(other), "--tokens", "6",
                    "--providers", "CPUExecutionProvider", capsys=capsys)
    assert code == 1


def test_positions_past_the_table_are_refused_before_decoding(tmp_path, capsys):
    """GPT-2 learns a table of positions: a prompt and tokens that run past it are a flag error,
    not a failure mid-way through the loop; the last position that fits is fine."""
    gpt2 = tmp_path / "gpt2.onnx"
    export_hf_decoder(gpt2, arch="gpt2", positions=32)
    code, stderr = _main("export.decode", str(gpt2), "--prompt", "24", "--tokens", "10", capsys=capsys)
    assert code == 2 and "a 24-token prompt and 10 tokens reach position 32, past the model's 32 positions" in stderr
    assert _main("export.decode", str(gpt2), "--prompt", "24", "--tokens", "9", "--warmup", "0", capsys=capsys)[0] == 0


def test_a_decoder_of_another_vocabulary_is_refused(decoders, tmp_path, capsys):
    other = tmp_path / "vocab200.onnx"
    export_hf_decoder(other, vocab=200)
    for first, second in ((decoders["reference"], other), (other, decoders["reference"])):
        code, stderr = _main("export.decode", str(first), "--compare", str(second), "--tokens", "3",
                             "--providers", "CPUExecutionProvider", capsys=capsys)
        assert code == 1 and len(stderr.strip().splitlines()) == 1
        assert f"{second}: its vocabulary has" in stderr and "not a form of the same decoder" in stderr
    a, b = (Generation(tokens=[[1]], step_logits=[np.zeros((1, n), np.float32)]) for n in (100, 200))
    with pytest.raises(NormfuseError, match=r"step 0: the compared decoder's scores are \[1, 200\], the reference's \[1, 100\]"):
        agreement([[1]], a, b, "float32")


def test_the_cache_is_found_by_its_names(decoders):
    decoder = decoder_of(load(decoders["fused"], providers=["CPUExecutionProvider"]), "m")
    assert decoder.logits == "logits" and decoder.position_ids
    assert decoder.cache[0] == ("past_key_values.0.key", "present.0.key") and len(decoder.cache) == 4
    assert decoder.cache_shapes["past_key_values.1.value"] == (None, 2, None, 16)


def test_a_model_that_is_not_a_decoder_is_one_line(rewritten, capsys):
    code, stderr = _main("export.decode", str(rewritten("rmsnorm")["reference"]), capsys=capsys)
    assert code == 1 and "not a KV-cache decoder" in stderr and len(stderr.strip().splitlines()) == 1


def test_an_engine_is_refused_before_loading(decoders, tmp_path, capsys):
    plan = tmp_path / "decoder.plan"
    plan.write_bytes(b"not an engine")
    code, stderr = _main("export.decode", str(plan), capsys=capsys)
    assert code == 2 and "decoding runs ONNX models" in stderr


def test_an_empty_cache_is_taken_by_onnx_runtime_not_by_the_check_for_engines(decoders):
    from export.runtime import TensorSpec, check_feeds

    with pytest.raises(NormfuseError, match="empty on axis 2"):
        check_feeds([TensorSpec("past", "float32", (None, 2, None, 16))], {"past": np.zeros((1, 2, 0, 16), np.float32)})
    model = load(decoders["reference"], providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64),
             "position_ids": np.array([[0, 1]]),
             **{f"past_key_values.{layer}.{kind}": np.zeros((1, 2, 0, 16), np.float32)
                for layer in range(2) for kind in ("key", "value")}}
    assert model.run(feeds)["present.0.key"].shape == (1, 2, 2, 16)


@pytest.mark.parametrize("runner_up,alike", [(1.0 - 1e-5, True), (0.5, False)])
def test_another_token_counts_only_in_a_near_tie(runner_up, alike):
    """fp32 graph tolerance: atol 1e-4, rtol 1e-3. The reference scores token 3 at 1.0; the
    candidate chose token 5, which the reference scores at `runner_up`."""
    scores = np.zeros((1, 8), np.float32)
    scores[0, 3], scores[0, 5] = 1.0, runner_up
    reference = Generation(tokens=[[3], [1]], step_logits=[scores, scores])
    candidate = Generation(tokens=[[5], [3]], step_logits=[scores, scores])
    result = agreement([[3], [3]], reference, candidate, "float32")
    assert result["same_tokens"] == 1 and result["near_ties"] == (1 if alike else 0)
    assert result["scores_within_tolerance"] and decoded_alike(result) is alike


@pytest.mark.parametrize("module,args", [("export.decode", ["MODEL", "--tokens", "1"]),
                                         ("export.build", ["--onnx", "MODEL", "--decode-tokens", "1"])])
def test_one_token_is_refused_it_has_no_decode_step(decoders, tmp_path, capsys, module, args):
    args = [str(decoders["reference"]) if a == "MODEL" else a for a in args]
    code, stderr = _main(module, *args, "--out" if module == "export.build" else "--json", str(tmp_path / "x"),
                         capsys=capsys)
    assert code == 2 and "at least 2" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_gpt2_decoder_reshapes_its_ids_and_keeps_its_layer_norms(tmp_path):
    """GPT-2 views input_ids before its embedding (the vocabulary is still found) and writes its
    norms as LayerNormalization ops: the ONNX Runtime form fuses every residual Add into them (3 of
    the 5 only since ONNX Runtime's symbolic inference sizes what that view leaves unknown to onnx's)
    and chooses the same tokens; its CPU form would be the reference itself, so on the CPU the build
    decodes the Skip-op form instead, and says so; with nothing fused at all it skips decoding."""
    from export.backends import index_bounds
    from export.build import Pipeline, parse_args

    reference, fused = tmp_path / "gpt2.onnx", tmp_path / "gpt2-fused.onnx"
    export_hf_decoder(reference, arch="gpt2")
    assert index_bounds(reference)["input_ids"] == 100
    assert rewrite_file(reference, fused, target="onnxruntime").counts == {"AddLayerNorm": 5}
    record = decode(reference, fused, prompt=4, tokens=8, warmup=0, providers=["CPUExecutionProvider"])
    assert decoded_alike(record["agreement"]) and record["agreement"]["same_tokens"] == 8
    from rich.console import Console

    pipeline = Pipeline(parse_args(["--onnx", str(reference), "--decode-tokens", "4"]), console=Console(quiet=True))
    skip_form = tmp_path / "fused.onnx"  # the name the build gives it
    fused.rename(skip_form)
    pipeline.decoded = {"ort-cpu": skip_form}  # as run_on sets it for such a decoder
    (record,) = pipeline.decode(reference, ["ort-cpu"], "float32")
    assert decoded_alike(record["agreement"]) and record["models"]["compared"]["model"] == str(skip_form)
    assert "Skip ops, decoded on the CPU because its CPU form is the reference itself" in record["note"]
    pipeline.decoded = {"ort-cpu": None}  # nothing fused for ONNX Runtime at all
    assert pipeline.decode(reference, ["ort-cpu"], "float32") == []
    assert pipeline.skipped == [{"stage": "ort-cpu greedy decoding", "reason": (
        "nothing to compare: the rewrite changed nothing in this decoder (it has no norm, or its norms are the "
        "single ops they would become already)")}]
    pipeline.decoded = {"ort-cpu": skip_form}
    assert pipeline.decode(reference, ["ort-cpu"], "bfloat16") == []  # as a bfloat16 decoder would be
    assert pipeline.skipped[-1]["reason"] == "ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Mul)"


def test_padded_prompts_need_a_position_input(tmp_path, capsys):
    """Without position_ids the model numbers padding as tokens: prompts of different lengths are
    refused up front (one length is fine)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"]),
         helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])], "no_positions",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 1, "past", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 10]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 1, "past", 4])],
        [numpy_helper.from_array(np.eye(10, dtype=np.float32), "table")])
    model = tmp_path / "no_positions.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    code, stderr = _main("export.decode", str(model), "--prompt", "4,2", capsys=capsys)
    assert code == 2 and "a decoder without a position_ids input would number the padding too" in stderr
    assert _main("export.decode", str(model), "--prompt", "4", "--batch", "2", "--tokens", "3", capsys=capsys)[0] == 0


def test_a_prompt_mask_of_another_shape_is_refused(decoders):
    model = load(decoders["fused"], providers=["CPUExecutionProvider"])
    with pytest.raises(UsageError, match="prompt_mask is 2x3, the prompt 2x5: one mask value per prompt token"):
        generate(model, decoder_of(model, "m"), np.ones((2, 5), np.int64), 2, prompt_mask=np.ones((2, 3)))


def test_a_pair_of_two_dtypes_is_judged_by_the_less_precise_either_way(decoders, tmp_path):
    """The fp16 export against the fp32 one: fp16's tolerance applies whichever is given first, and
    the record names both."""
    half = tmp_path / "decoder-fp16.onnx"
    export_hf_decoder(half, dtype="float16")
    forward = decode(decoders["reference"], half, prompt=4, tokens=3, warmup=0, providers=["CPUExecutionProvider"])
    backward = decode(half, decoders["reference"], prompt=4, tokens=3, warmup=0, providers=["CPUExecutionProvider"])
    assert forward["dtype"] == backward["dtype"] == "float16"
    assert forward["dtypes"] == ["float32", "float16"] and backward["dtypes"] == ["float16", "float32"]
    assert decoded_alike(forward["agreement"]) and decoded_alike(backward["agreement"])


def test_the_readme_loop_runs(decoders):
    """README's example of the loop as a function runs as written (on the fused decoder here)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "export.decode import" in block and "encode" not in block]
    scope: dict = {}
    exec(code.replace("build/decoder/fused-cpu.onnx", str(decoders["fused"])), scope)
    assert scope["tokens"].shape == (2, 16)
    # the padded sequence chooses what it chooses alone
    alone = generate_alone(decoders["fused"], [17, 42, 7], 16)
    assert list(scope["tokens"][0]) == alone


def generate_alone(path, prompt: list[int], tokens: int) -> list[int]:
    from export.decode import generate

    model = load(path, providers=["CPUExecutionProvider"])
    return [step[0] for step in generate(model, decoder_of(model, "m"), np.asarray([prompt]), tokens).tokens]


@pytest.mark.parametrize("arch,norms", [("qwen3", 9), ("gemma", 5)])
def test_other_decoders_serve_the_same_tokens_fused(tmp_path, capsys, arch, norms):
    """Qwen3 (RMSNorms on each head's queries and keys as well) and Gemma (scaled by 1 + w), with
    their caches: every norm fused, and the fused decoder chooses the reference's tokens on a
    left-padded batch."""
    from export.decode import main

    reference, fused = tmp_path / f"{arch}.onnx", tmp_path / f"{arch}-fused-cpu.onnx"
    export_hf_decoder(reference, arch=arch)
    report = rewrite_file(reference, fused, target="onnxruntime", residual=False)
    assert report.fused == norms and not report.rejected
    assert main([str(reference), "--compare", str(fused), "--prompt", "5,2", "--tokens", "10", "--warmup", "0",
                 "--providers", "CPUExecutionProvider"]) == 0
    assert "compared: same: the same tokens at 10/10 steps" in capsys.readouterr().out


def genai_names(source, target):
    """The decoder with ONNX Runtime GenAI's dimension names: the mask and the present cache
    `total_sequence_length` long, and the head size a dynamic `kv_cache_dim`."""
    import onnx

    model = onnx.load(str(source))
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.dim_param == "past_sequence_length + sequence_length":
                dim.dim_param = "total_sequence_length"
            if value.name.startswith(("past_key_values.", "present.")) and axis == 3:
                dim.Clear()
                dim.dim_param = "kv_cache_dim"
    onnx.save(model, str(target))
    return target


def test_a_decoder_named_as_onnx_runtime_genai_names_it(decoders, tmp_path, capsys):
    """The cache length is the axis whose name grows from past to present, the mask's
    total_sequence_length is past + new tokens, and the head size comes from --dim."""
    from export.dims import input_shapes
    from export.runtime import load

    genai = genai_names(decoders["reference"], tmp_path / "genai.onnx")
    code, err = _main("export.decode", str(genai), "--tokens", "4", capsys=capsys)
    assert code == 1 and "kv_cache_dim" in err and "--dim NAME=SIZE" in err and len(err.strip().splitlines()) == 1
    expected = decode(decoders["reference"], prompt=5, tokens=6, warmup=0, providers=["CPUExecutionProvider"])
    record = decode(genai, prompt=5, tokens=6, warmup=0, providers=["CPUExecutionProvider"], dims={"kv_cache_dim": 16})
    assert record["models"]["reference"]["tokens"] == expected["models"]["reference"]["tokens"]
    shapes = input_shapes(load(genai, providers=["CPUExecutionProvider"]).inputs, 1, 3,
                          {"kv_cache_dim": 16, "past_sequence_length": 5})
    assert shapes["attention_mask"] == [1, 8] and shapes["past_key_values.0.key"] == [1, 2, 5, 16]
    assert _main("export.run", str(genai), "--random", "1x3", "--dim", "kv_cache_dim=16", "--dim",
                 "past_sequence_length=5", capsys=capsys)[0] == 0
    code, err = _main("export.decode", str(genai), "--dim", "head_dim=16", capsys=capsys)
    assert code == 2 and "--dim head_dim: the model has no dimension of that name" in err and "kv_cache_dim" in err


def merged_decoder(decoder_path, path):
    """`decoder_path` as Optimum's merged decoders hold it (decoder_model_merged.onnx, as
    transformers.js serves them): the decoder twice, once per branch of an If on a
    `use_cache_branch` input of shape [1], under the same names; the weights stay in the main graph."""
    from onnx import TensorProto, helper

    model = onnx.load(str(decoder_path))
    branches = {}
    for branch in ("then_branch", "else_branch"):
        body = onnx.GraphProto()
        body.CopyFrom(model.graph)
        del body.input[:], body.initializer[:], body.value_info[:]
        body.name = branch
        branches[branch] = body
    graph = model.graph
    outputs = list(graph.output)
    if_node = helper.make_node("If", ["use_cache_branch"], [o.name for o in outputs], name="optimum::if", **branches)
    del graph.node[:], graph.value_info[:]
    graph.node.append(if_node)
    graph.input.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    onnx.save(model, str(path))
    return path


def test_a_merged_decoder_is_driven_and_built_through_both_branches(decoders, tmp_path):
    """A merged decoder runs its prefill with `use_cache_branch` false and its steps with it true,
    decoding the plain decoder's tokens; the build fuses the norms of both branches, validates each
    (the mask of the cache branch covering the cache too) and decodes."""
    from export.build import main as build_main

    merged = merged_decoder(decoders["reference"], tmp_path / "decoder_model_merged.onnx")
    record = decode(merged, decoders["reference"], prompt=4, tokens=6, warmup=0, providers=["CPUExecutionProvider"])
    assert decoded_alike(record["agreement"]) and record["agreement"]["same_tokens"] == 6

    model = load(merged, providers=["CPUExecutionProvider"])
    decoder = decoder_of(model, merged.name)
    switches = []
    real_run = model.run
    model.run = lambda feeds: switches.append(bool(feeds["use_cache_branch"][0])) or real_run(feeds)
    generate(model, decoder, np.array([[5, 7, 9]]), 3)
    assert switches == [False, True, True]

    out = tmp_path / "build"
    assert build_main(["--onnx", str(merged), "--out", str(out), "--runs", "2", "--warmup", "0", "--decode-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rewrite"]["fused"] == 10  # 5 per branch
    settings = {(p["candidate"], p["switches"]["use_cache_branch"]) for p in report["validation"]}
    assert {setting for _, setting in settings} == {True, False} and all(p["passed"] for p in report["validation"])
    assert report["decode"] and all(d["agreement"]["same_tokens"] == 4 for d in report["decode"])
