"""export.decode on an encoder-decoder laid out as Optimum exports one (encoder_model.onnx and
decoder_model_merged.onnx): its tokens and scores against transformers' own generate, and the
fused pair against the reference."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.decode import decoder_of, encode, generate, main as decode_main
from export.runtime import load

pytest.importorskip("transformers")

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """{"torch": the model, "reference": folder as exported, "fused": the same files rewritten}."""
    from models.hf_seq2seq import export_hf_seq2seq

    from export.rewrite.__main__ import main as rewrite_main

    root = tmp_path_factory.mktemp("t5")
    model = export_hf_seq2seq(root / "reference", arch="t5", halves=True)
    # the whole folder, as a user rewrites Optimum's: every model, and config.json copied
    report = root / "rewrite.json"
    assert rewrite_main([str(root / "reference"), "-o", str(root / "fused"), "--target", "onnxruntime",
                         "--no-residual", "--report", str(report)]) == 0
    fused = json.loads(report.read_text())["models"]
    assert sorted(fused) == ["decoder_model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx",
                             "encoder_model.onnx"] and all(r["fused"] > 0 for r in fused.values())
    assert (root / "fused" / "config.json").read_text() == (root / "reference" / "config.json").read_text()
    return {"torch": model, "reference": root / "reference", "fused": root / "fused"}


def hf_generate(model, ids: np.ndarray, tokens: int, mask: np.ndarray | None = None):
    """transformers' greedy generate: (tokens after the start token, each step's scores)."""
    import torch

    model.generation_config.eos_token_id = None  # run every step, as export.decode does
    ids = torch.tensor(ids)
    mask = torch.ones_like(ids) if mask is None else torch.tensor(mask)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                         num_beams=1, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, 1:].numpy(), [s.numpy() for s in out.scores]


def test_tokens_and_scores_are_transformers_generate(t5):
    """The encoder runs once, the first step computes the encoder's keys and values, every later step
    reads them back (the merged decoder's branch with a cache returns only placeholders for them):
    each step's scores are transformers' to fp32 tolerance, and the greedy tokens vary and match."""
    folder = t5["reference"]
    decoder_model, encoder_model = load(folder / "decoder_model_merged.onnx", providers=CPU), load(folder / "encoder_model.onnx", providers=CPU)
    decoder = decoder_of(decoder_model, "decoder")
    assert decoder.context == ("encoder_hidden_states", "encoder_attention_mask") and not decoder.attention_mask
    assert sorted(decoder.fixed_cache) == sorted(p for p, _ in decoder.cache if ".encoder." in p) and decoder.fixed_cache
    ids = np.random.default_rng(3).integers(3, 100, size=(2, 7)).astype(np.int64)
    context, _ = encode(encoder_model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, decoder)
    done = generate(decoder_model, decoder, np.zeros((2, 1), np.int64), 10, context=context)
    expected_tokens, expected_scores = hf_generate(t5["torch"], ids, 10)
    np.testing.assert_array_equal(np.array(done.tokens).T, expected_tokens)
    assert len(set(expected_tokens.ravel().tolist())) > 3  # tokens that depend on the cache
    for got, want in zip(done.step_logits, expected_scores):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_inputs_of_different_lengths_are_padded_on_the_right_and_masked_as_transformers_does(t5, tmp_path):
    """--prompt 7,4: the shorter input is padded after its tokens and masked out, in the encoder and
    in the decoder's cross-attention; tokens and scores are transformers' generate on the same batch."""
    out = tmp_path / "decode.json"
    assert decode_main([str(t5["reference"]), "--prompt", "7,4", "--tokens", "8", "--warmup", "0",
                        "--providers", "CPUExecutionProvider", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [len(p) for p in record["prompt"]] == [7, 4]
    ids = np.zeros((2, 7), np.int64)  # T5's pad token is 0
    mask = np.zeros((2, 7), np.int64)
    for row, prompt in enumerate(record["prompt"]):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
    expected, _ = hf_generate(t5["torch"], ids, 8, mask)
    np.testing.assert_array_equal(np.array(record["models"]["reference"]["tokens"]).T, expected)
    unmasked, _ = hf_generate(t5["torch"], ids, 8)  # the padding read as tokens gives other tokens
    assert not np.array_equal(unmasked[1], expected[1])


def test_the_fused_pair_decodes_alike_and_the_command_writes_its_record(t5, tmp_path):
    """The rewritten encoder and decoder, each reading its own encoder's states, choose the
    reference's tokens with scores in tolerance; exit 0, and the record has both encoders' times."""
    ref, fused = t5["reference"], t5["fused"]
    out = tmp_path / "decode.json"
    assert decode_main([str(ref / "decoder_model_merged.onnx"), "--encoder", str(ref / "encoder_model.onnx"),
                        "--compare", str(fused / "decoder_model_merged.onnx"), "--compare-encoder",
                        str(fused / "encoder_model.onnx"), "--tokens", "6", "--prompt", "5", "--batch", "2",
                        "--warmup", "0", "--providers", "CPUExecutionProvider", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["start_token"] == 0  # decoder_start_token_id of the config.json beside the decoder
    assert record["agreement"]["same_tokens"] == record["agreement"]["steps"] == 6
    assert record["agreement"]["scores_within_tolerance"]
    assert [len(p) for p in record["prompt"]] == [5, 5]  # the encoder's input ids
    assert record["encoder_inputs"] == {"input_ids": [2, 5], "attention_mask": [2, 5]}
    for label, folder in (("reference", ref), ("compared", fused)):
        run = record["models"][label]
        assert run["encoder"] == str(folder / "encoder_model.onnx") and run["encoder_ms"] > 0
        assert len(run["tokens"]) == 6


def test_rewriting_keeps_the_declared_dims_of_the_merged_decoders_outputs(t5):
    """ONNX Runtime's symbolic inference names an If's outputs afresh (If_0_o3__d0); the rewritten
    model keeps the dims it declared (batch_size, encoder_sequence_length), which is how the
    decoding loop tells the encoder's cache, which does not grow, from the decoder's."""
    def dims(path):
        return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                for o in onnx.load(str(path), load_external_data=False).graph.output}

    name = "decoder_model_merged.onnx"
    declared = dims(t5["reference"] / name)
    assert declared["present.0.encoder.key"][0] == "batch_size"
    assert dims(t5["fused"] / name) == declared


def split_folder(folder, target):
    """A copy of `folder` as older Optimum exports are: the decoder's two halves, no merged form."""
    import shutil

    target.mkdir()
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json"):
        shutil.copy(folder / name, target / name)
    return target


def test_a_folder_of_the_two_halves_decodes_as_the_merged_form(t5, tmp_path):
    """The first step runs decoder_model.onnx, the steps after decoder_with_past_model.onnx (each fed
    the inputs it takes, the encoder's keys and values from the first step): its scores are the
    merged decoder's at every step, and the fused halves decode as the reference halves."""
    halves = split_folder(t5["reference"], tmp_path / "halves")
    fused = split_folder(t5["fused"], tmp_path / "fused_halves")
    for reference, compared in ((t5["reference"], halves), (halves, fused)):
        out = tmp_path / "decode.json"
        assert decode_main([str(reference), "--compare", str(compared), "--tokens", "6", "--batch", "2", "--warmup", "0",
                            "--providers", "CPUExecutionProvider", "--json", str(out)]) == 0
        record = json.loads(out.read_text())
        agreement = record["agreement"]
        assert agreement["same_tokens"] == 6 and agreement["scores_within_tolerance"], agreement
        assert record["models"]["compared"]["model"] == str(compared)
    assert len({t for step in record["models"]["reference"]["tokens"] for t in step}) > 2  # tokens that vary


@pytest.mark.parametrize("half, side", [("decoder_model.onnx", "without"), ("decoder_with_past_model.onnx", "with")])
def test_either_half_of_the_decoder_is_pointed_to_the_merged_form(t5, capsys, half, side):
    ref = t5["reference"]
    argv = [str(ref / half), "--encoder", str(ref / "encoder_model.onnx"), "--tokens", "2", "--warmup", "0",
            "--providers", "CPUExecutionProvider"]
    assert decode_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"one half of an encoder-decoder's decoder ({side} its cache)" in err
    assert "decode the folder holding both (decoder_model.onnx and decoder_with_past_model.onnx)" in err


@pytest.mark.parametrize("flags, message", [
    ([], "give its encoder with --encoder"),
    (["--compare-encoder", "{ref}/encoder_model.onnx"], "--compare-encoder goes with --compare"),
    (["--encoder", "{ref}/encoder_model.onnx", "--prompt", "4,3", "--dim", "encoder_sequence_length=6"],
     "prompts of different lengths, but the encoder's inputs are 6 tokens long"),
    (["--encoder", "{ref}/encoder_model.onnx", "--dim", "nope=3"],
     "decoder_model_merged.onnx or {ref}/encoder_model.onnx: --dim nope: the model has no dimension of that name"),
])
def test_bad_encoder_decoder_flags_are_one_line_errors(t5, capsys, flags, message):
    ref = t5["reference"]
    argv = [str(ref / "decoder_model_merged.onnx"), *(f.format(ref=ref) for f in flags), "--tokens", "2",
            "--warmup", "0", "--providers", "CPUExecutionProvider"]
    assert decode_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(ref=ref) in err and len(err.splitlines()) == 1, err


def test_a_dim_of_the_decoder_alone_is_not_asked_of_its_encoder(t5):
    """--dim names a dimension of the decoder or of its encoder; each gets the sizes it has (the
    encoder has no past_decoder_sequence_length)."""
    assert decode_main([str(t5["reference"]), "--tokens", "2", "--warmup", "0", "--providers", "CPUExecutionProvider",
                        "--dim", "past_decoder_sequence_length=5", "--dim", "encoder_sequence_length=6"]) == 0


def test_an_encoder_for_a_decoder_only_model_is_refused(t5, tmp_path, capsys):
    from models.hf_decoder import export_hf_decoder

    path = tmp_path / "decoder.onnx"
    export_hf_decoder(path)
    argv = [str(path), "--encoder", str(t5["reference"] / "encoder_model.onnx"), "--tokens", "2", "--warmup", "0",
            "--providers", "CPUExecutionProvider"]
    assert decode_main(argv) == 2
    assert "takes no encoder_hidden_states" in capsys.readouterr().err


def test_the_build_of_an_encoder_decoders_decoder_says_how_to_decode_it(t5, tmp_path):
    """export.build validates and times the merged decoder on its own (its encoder states made up),
    and its report says that decoding needs the encoder, and with which command."""
    from export.build import main as build_main

    out = tmp_path / "out"
    assert build_main(["--onnx", str(t5["reference"] / "decoder_model_merged.onnx"), "--out", str(out), "--runs", "2",
                       "--warmup", "0", "--backend", "ort-cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation"] and all(p["passed"] for p in report["validation"])
    said = [s["reason"] for s in report["skipped"] if s["stage"] == "greedy decoding"]
    assert len(said) == 1 and "python -m export.decode decoder_model_merged.onnx --encoder" in said[0]


def test_folders_in_optimums_layout_are_decoded_as_they_stand(t5, tmp_path, capsys):
    """A folder gives its merged decoder and its encoder; the compared folder its own."""
    out = tmp_path / "decode.json"
    assert decode_main([str(t5["reference"]), "--compare", str(t5["fused"]), "--tokens", "4", "--warmup", "0",
                        "--providers", "CPUExecutionProvider", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    for label, folder in (("reference", t5["reference"]), ("compared", t5["fused"])):
        run = record["models"][label]
        assert (run["model"], run["encoder"]) == (str(folder / "decoder_model_merged.onnx"), str(folder / "encoder_model.onnx"))
    assert record["agreement"]["same_tokens"] == 4
    (tmp_path / "empty").mkdir()
    assert decode_main([str(tmp_path / "empty")]) == 2
    assert "no decoder in this folder" in capsys.readouterr().err


def test_export_validate_compares_a_folder_model_by_model(t5, tmp_path, capsys, monkeypatch):
    """export.validate REFERENCE_FOLDER FUSED_FOLDER: each model against the one of the same name, each
    sized by the --dim flags it has; a line per output, prefixed with the model; exit 1 when one fails."""
    from export.validate import main as validate_main
    from normops import GRAPH, Tolerance

    out = tmp_path / "validate.json"
    argv = [str(t5["reference"]), str(t5["fused"]), "--shapes", "1x6", "--dim", "past_decoder_sequence_length=3"]
    assert validate_main([*argv, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert sorted(record) == ["decoder_model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx",
                              "encoder_model.onnx"]
    assert all(pair["passed"] for pairs in record.values() for pair in pairs)
    terminal = capsys.readouterr().out
    assert "encoder_model.onnx: PASS 1x6 last_hidden_state" in terminal and "4 models: every output passed" in terminal
    monkeypatch.setitem(GRAPH, "float32", Tolerance(atol=1e-12, rtol=0.0))
    assert validate_main(argv) == 1 and "some outputs FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("candidate, flags, message", [
    ("{fused}/encoder_model.onnx", [], "so the candidate must be one too"),
    ("{fused}", ["--inputs", "x.npz"], "--inputs gives one model's inputs"),
    ("{partial}", [], "no decoder_model.onnx (each model of"),
])
def test_export_validate_on_folders_refuses_bad_pairs_in_one_line(t5, tmp_path, capsys, candidate, flags, message):
    from export.validate import main as validate_main

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "encoder_model.onnx").write_bytes((t5["fused"] / "encoder_model.onnx").read_bytes())
    code = validate_main([str(t5["reference"]), candidate.format(fused=t5["fused"], partial=tmp_path / "partial"), *flags])
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and message in err and len(err.splitlines()) == 1, err


def test_the_readme_encoder_decoder_loop_gives_transformers_tokens(t5):
    """README's encoder-decoder example runs as written on the fused folder, and its tokens for a
    batch with right padding are transformers' generate on the same ids and mask."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "encode(encoder" in block]
    scope: dict = {}
    exec(code.replace('"fused/"', repr(str(t5["fused"]))), scope)
    assert scope["tokens"].shape == (2, 16)
    expected, _ = hf_generate(t5["torch"], scope["ids"], 16, scope["mask"])
    np.testing.assert_array_equal(scope["tokens"], expected)


def test_export_bench_times_a_folder_model_by_model(t5, tmp_path, capsys):
    """export.bench REFERENCE_FOLDER FUSED_FOLDER: each model against the one of the same name, each
    with the --dim flags it has; a JSON entry per model."""
    from export.bench import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main([str(t5["reference"]), str(t5["fused"]), "--runs", "2", "--warmup", "0", "--seq", "6",
                       "--dim", "past_decoder_sequence_length=3", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert sorted(record) == ["decoder_model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx",
                              "encoder_model.onnx"]
    assert all([r["graph"] for r in results] == ["reference", "fused"] for results in record.values())
    assert "encoder_model.onnx: fused p50 is" in capsys.readouterr().out
    assert bench_main([str(t5["reference"]), str(t5["fused"] / "encoder_model.onnx")]) == 2
    assert "so the fused one must be one too" in capsys.readouterr().err
