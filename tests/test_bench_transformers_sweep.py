"""bench/transformers_sweep.py: transformers' model types built small, exported, rewritten and
validated, each in a process of its own."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "transformers_sweep.py"


@pytest.fixture(scope="module")
def sweep(bench_script):
    return bench_script("transformers_sweep")


def test_two_model_types_are_swept_to_the_end(tmp_path):
    """LLaMA (RMSNorm) and wav2vec2 (LayerNorm, fed a waveform), two at once, each in its own
    process: every norm module's call fused for TensorRT, the onnxruntime form validated at two
    dynamic shapes; records and Markdown written. wav2vec2's feature projection's LayerNorm, with no
    residual to fuse, is already ONNX Runtime's own op as a plain LayerNormalization; its
    convolution calls its weight norm as a module: not counted. (BERT, a third type once here, is
    fused and matched in tests/test_rewrite_hf_models.py; each type swept costs this suite seconds.)"""
    out = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--types", "llama,wav2vec2", "--jobs", "2", "--json",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["versions"]["transformers"] and payload["dtype"] == "float32" and payload["unswept"] == []
    records = {r["type"]: r for r in payload["records"]}
    for name, calls, kinds in (("llama", 5, {"AddRMSNorm": 4, "RMSNorm": 1}), ("wav2vec2", 6, {"AddLayerNorm": 5})):
        record = records[name]
        assert record["stage"] == "done", record.get("error")
        assert record["shapes"] == "dynamic"
        assert record["norm_calls"] == record["norms_in_output"] == record["fused_norms"] == calls
        assert record["fused"]["onnxruntime"] == kinds
        assert record["validated"] and record["max_abs"] < 1e-4
    assert records["wav2vec2"]["inputs"] == {"input_values": [2, 4000]}
    assert records["wav2vec2"]["norm_modules"] == {"LayerNorm": 6}
    table = out.with_suffix(".md").read_text()
    assert "| ok | 2 |" in table and "| llama | dynamic | 5 | 5 | 4 AddRMSNorm, 1 RMSNorm |" in table
    assert "Unfinished" not in table


def test_an_unknown_type_is_a_one_line_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--types", "llama,no_such_model"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["transformers_sweep: error: not a base model type of transformers: "
                                                "no_such_model"]


def test_a_stage_that_fails_is_the_rows_reason(sweep, tmp_path):
    """A model whose forward needs inputs the sweep does not make stops there, saying which."""
    record = sweep.sweep_one("perceiver", "float32", tmp_path)
    assert record["stage"] == "forward" and "(needs inputs)" in record["error"], record


def test_norm_calls_the_output_does_not_depend_on_are_told_apart(sweep):
    """A pooler's norm, or one on tokens the last layer drops, is called but left out of the export:
    autograd tells which calls the output depends on."""
    import torch

    class PooledTwice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.dropped, self.pooler_norm = (torch.nn.LayerNorm(8), torch.nn.RMSNorm(8),
                                                         torch.nn.LayerNorm(8))

        def forward(self, x):
            hidden = self.norm(self.norm(x) + x)
            self.pooler_norm(hidden.mean(1))  # computed, not returned
            return hidden + 0 * self.dropped(x).detach()  # no gradient through it either

    model = PooledTwice()
    calls, in_output = sweep.count_norm_calls(model, lambda: model(torch.randn(2, 4, 8)))
    assert calls == {"LayerNorm": 3, "RMSNorm": 1} and in_output == 2
    # a tuple of outputs (MGP-STR's three heads): the norms any of them depends on
    calls, in_output = sweep.count_norm_calls(model, lambda: (model(torch.randn(2, 4, 8)), model.pooler_norm(
        torch.randn(2, 8))))
    assert calls == {"LayerNorm": 4, "RMSNorm": 1} and in_output == 3
    # no gradient to follow, or run without gradients: not known
    assert sweep.count_norm_calls(model, lambda: model(torch.randn(2, 4, 8)).argmax(-1))[1] is None
    assert sweep.count_norm_calls(model, lambda: model(torch.randn(2, 4, 8)), gradients=False)[1] is None


def test_two_equal_norms_of_one_tensor_are_one_norm(sweep):
    """GPT-NeoX's parallel residual puts two LayerNorms on one input; with equal weights (random
    init) the exporter merges them into one node, so they count once. Different weights, or a
    different input, are two norms."""
    import torch

    class Parallel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm, self.mlp_norm = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.attention_norm(x) + self.mlp_norm(x) + self.mlp_norm(x + 1)

    model = Parallel()
    run = functools.partial(model, torch.randn(2, 4, 8))
    assert sweep.count_norm_calls(model, run) == ({"LayerNorm": 3}, 2)
    with torch.no_grad():
        model.mlp_norm.weight.mul_(2)
    assert sweep.count_norm_calls(model, run) == ({"LayerNorm": 3}, 3)


def test_the_first_spectrogram_layout_that_runs_is_used(sweep):
    """Whisper takes mel bins then frames, Speech2Text frames then features: both are offered, and
    the one the forward accepts is used."""
    import types

    import torch

    class FramesFirst(torch.nn.Module):
        def __init__(self, features=24):
            super().__init__()
            self.project, self.norm = torch.nn.Linear(features, 8), torch.nn.LayerNorm(8)

        def forward(self, input_features):
            return types.SimpleNamespace(last_hidden_state=self.norm(self.project(input_features)))

    model = FramesFirst()
    candidates = sweep.example_inputs(model, types.SimpleNamespace(num_mel_bins=24))
    assert [list(c[0]["input_features"].shape) for c in candidates] == [[2, 24, sweep.FRAMES], [2, sweep.FRAMES, 24]]
    inputs, shapes, axes, fixed, calls, in_output = sweep.first_forward(model, candidates)
    assert list(inputs["input_features"].shape) == [2, sweep.FRAMES, 24]
    assert axes == {"input_features": {0: "batch", 1: "frames"}}
    assert calls == {"LayerNorm": 1} and in_output == 1 and shapes == sweep.SPECTROGRAM_SHAPES
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # one candidate: its own error
        sweep.first_forward(model, candidates[:1])
    # none runs: each candidate's inputs and error, since which one tells the cause differs by model
    with pytest.raises(sweep.NoInputsRan) as raised:
        sweep.first_forward(FramesFirst(features=30), candidates)
    message = str(raised.value)
    assert message.startswith(f"input_features 2x24x{sweep.FRAMES}: RuntimeError: mat1 and mat2 shapes cannot be")
    assert f"; input_features 2x{sweep.FRAMES}x24: " in message


def test_a_dual_encoder_is_given_ids_and_pixels(sweep):
    """CLIP and SigLIP take input_ids and pixel_values, and need both: offered after ids alone."""
    import types

    import torch

    class TextAndImage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm = torch.nn.Embedding(256, 8), torch.nn.LayerNorm(8)

        def forward(self, input_ids=None, pixel_values=None):
            return (self.norm(self.embed(input_ids)) * pixel_values.mean(),)

    config = types.SimpleNamespace(vocab_size=256, vision_config=types.SimpleNamespace(image_size=32, num_channels=3))
    inputs, shapes, axes, fixed, calls, in_output = sweep.first_forward(TextAndImage(), sweep.example_inputs(TextAndImage(), config))
    assert {name: list(v.shape) for name, v in inputs.items()} == {"input_ids": [2, 16], "pixel_values": [2, 3, 32, 32]}
    assert axes == {"input_ids": {0: "batch", 1: "sequence"}, "pixel_values": {0: "batch"}} and in_output == 1


def test_a_video_model_is_given_frames(sweep):
    """VideoMAE and ViViT take (batch, frames, channels, height, width): offered after images."""
    import types

    import torch

    class Frames(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, pixel_values=None):
            batch, frames, channels, height, width = pixel_values.shape
            return (self.norm(pixel_values.reshape(batch, frames * channels * height, width)),)

    config = types.SimpleNamespace(image_size=16, num_channels=3, num_frames=4)
    inputs = sweep.first_forward(Frames(), sweep.example_inputs(Frames(), config))[0]
    assert list(inputs["pixel_values"].shape) == [2, 4, 3, 16, 16]


def test_a_rows_reason_is_one_line_of_the_cause(sweep):
    """torch.onnx's message is many lines, with the cause under its "## Exception summary"."""
    message = ("Failed to export the model with torch.export. This is step 1/3 of exporting the model to ONNX.\n"
               "- Debug `torch.export.export` and submit a PR to PyTorch.\n\n## Exception summary\n\n"
               "<class 'GuardOnDataDependentSymNode'>: Could not guard on data-dependent expression\n\n"
               "(Refer to the full stack trace above for more information.)")
    assert sweep.reason(message) == "<class 'GuardOnDataDependentSymNode'>: Could not guard on data-dependent expression"
    assert sweep.reason("while tracing\nRuntimeError: shapes differ\nsee above") == "RuntimeError: shapes differ"
    assert sweep.reason("one line") == "one line" and sweep.reason("") == ""


def test_verdicts(sweep):
    done = {"stage": "done", "validated": True, "norm_calls": 5, "fused_norms": 5, "rejected": []}
    assert sweep.verdict(done) == "ok"
    assert sweep.verdict({**done, "fused_norms": 4}) == "check"  # a norm unaccounted for
    assert sweep.verdict({**done, "fused_norms": 4, "rejected": ["not over the last axis"]}) == "ok"
    assert sweep.verdict({**done, "fused_norms": 9}) == "ok"  # functional norms have no module to count
    # a pooler's norm is called, but the exported output does not depend on it
    assert sweep.verdict({**done, "fused_norms": 4, "norms_in_output": 4}) == "ok"
    assert sweep.verdict({**done, "fused_norms": 3, "norms_in_output": 4}) == "check"
    assert sweep.verdict({**done, "fused_norms": 4, "norms_in_output": None}) == "check"
    assert sweep.calls_cell({**done, "norms_in_output": 4}) == "5 (4)" and sweep.calls_cell(done) == "5"
    # a norm module spelled as no norm (Zaya's max(||x||, eps)) is explained by its refusal, one each
    assert sweep.verdict({**done, "fused_norms": 3, "refused_spellings": ["outside the root"] * 2}) == "ok"
    # ... but an F.normalize elsewhere does not explain a norm missed
    assert sweep.verdict({**done, "fused_norms": 3, "refused_spellings": ["outside the root"]}) == "check"
    assert sweep.verdict({**done, "validated": False}) == "failed"
    assert sweep.verdict({"stage": "export"}) == "stopped at export"
    assert sweep.verdict({"stage": "timeout"}) == "timeout"


def test_a_failed_validation_is_listed_with_its_diagnosis(sweep):
    """A row whose validation failed carries the norm check's line (and the choices' clause), and
    the Markdown lists it under the table; a row that passed has none."""
    done = {"stage": "done", "validated": True, "norm_calls": 5, "fused_norms": 5, "rejected": [], "shapes": "dynamic",
            "fused": {"onnxruntime": {"RMSNorm": 5}}, "nodes": [50, 30], "max_abs": 0.001}
    failed = {**done, "type": "moe", "validated": False, "max_abs": 0.09,
              "diagnosis": "2x32: each fused norm ... within tolerance ...; TopK 'router' picks other indices in 1 of 64 rows"}
    text = sweep.markdown([{**done, "type": "dense"}, failed], "float16", [])
    assert text.endswith("- moe at 2x32: each fused norm ... within tolerance ...; TopK 'router' picks other indices in "
                         "1 of 64 rows\n")
    assert "- dense at" not in text
    assert "Failed validations" not in sweep.markdown([{**done, "type": "dense"}], "float16", [])


def test_state_space_heads_still_tile_the_expanded_hidden_size(sweep):
    """Mamba2's heads and their size are shrunk to fit expand x hidden; Falcon-H1's, which already
    fit its own SSM width, are left alone."""
    from transformers import AutoConfig

    mamba2, falcon = AutoConfig.for_model("mamba2"), AutoConfig.for_model("falcon_h1")
    falcon_heads = (falcon.mamba_n_heads, falcon.mamba_d_head)
    for config in (mamba2, falcon):
        sweep.shrink(config)
    assert mamba2.num_heads * mamba2.head_dim == mamba2.expand * mamba2.hidden_size == 128
    assert (falcon.mamba_n_heads, falcon.mamba_d_head) == falcon_heads


def test_per_layer_lists_are_cut_with_the_layers(sweep):
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3n_text")
    sweep.shrink(config)
    assert config.num_hidden_layers == 2 and len(config.layer_types) == 2 and config.hidden_size == 64
    assert config.pad_token_id < config.vocab_size == 256
    mla = AutoConfig.for_model("minicpm3")  # multi-head latent attention: rope sees the rotary part only
    sweep.shrink(mla)
    assert mla.head_dim == mla.qk_rope_head_dim == 8 and mla.qk_head_dim == 16
    assert mla.num_key_value_heads == mla.num_attention_heads == 4  # latent keys: one per query head
    mistral4 = AutoConfig.for_model("mistral4")  # its head_dim is the whole query-key head
    sweep.shrink(mistral4)
    assert mistral4.head_dim == mistral4.qk_head_dim == 16 and mistral4.qk_rope_head_dim == 8


def test_key_and_value_heads_stay_one_per_query_head_or_grouped(sweep):
    """Llama's default config has a key and value head per query head: it keeps them so. Mistral's
    are grouped (8 for 32): shrunk to SMALL's 2 for 4, still grouped."""
    from transformers import AutoConfig

    llama, mistral = AutoConfig.for_model("llama"), AutoConfig.for_model("mistral")
    for config in (llama, mistral):
        sweep.shrink(config)
    assert llama.num_key_value_heads == llama.num_attention_heads == 4
    assert (mistral.num_key_value_heads, mistral.num_attention_heads) == (2, 4)


def test_fields_a_config_leaves_unset_get_what_their_default_means(sweep, tmp_path):
    """Ministral's default config leaves head_dim None, Nemotron's num_key_value_heads and DeepSeek
    V2's num_experts_per_tok (beside 160 routed experts), and dots.llm1's every expert count:
    their models read them as numbers and fail. Shrunk, they are the hidden size over the heads,
    one per query head, and SMALL's counts.
    Gemma 4's num_experts None means no mixture of experts: it stays None. ESM's default config has
    no vocabulary size or padding token (its positions count past the padding, RoBERTa's way), and
    LFM2-MoE's no layer types, which LFM2's config makes every layer full attention by default:
    they get SMALL's vocabulary, ESM's tokenizer's <pad> and full attention. Ministral then runs."""
    from transformers import AutoConfig

    configs = {name: AutoConfig.for_model(name)
               for name in ("ministral", "nemotron", "deepseek_v2", "gemma4_text", "dots1", "esm", "lfm2_moe", "lfm2")}
    assert configs["esm"].vocab_size is None and configs["esm"].pad_token_id is None and configs["lfm2_moe"].layer_types is None
    assert configs["lfm2"].layer_types == ["full_attention"] * configs["lfm2"].num_hidden_layers  # LFM2's own default
    assert configs["ministral"].head_dim is None and configs["nemotron"].num_key_value_heads is None
    assert configs["deepseek_v2"].num_experts_per_tok is None and configs["gemma4_text"].num_experts is None
    assert configs["dots1"].n_routed_experts is None and configs["dots1"].n_shared_experts is None
    for config in configs.values():
        sweep.shrink(config)
    assert configs["ministral"].head_dim == 64 // 4 == configs["ministral"].hidden_size // configs["ministral"].num_attention_heads
    assert configs["nemotron"].num_key_value_heads == configs["nemotron"].num_attention_heads == 4
    assert configs["deepseek_v2"].num_experts_per_tok == 2
    assert configs["gemma4_text"].num_experts is None
    # dots.llm1 places experts (first_k_dense_replace) its default config does not count
    assert (configs["dots1"].n_routed_experts, configs["dots1"].num_experts_per_tok, configs["dots1"].n_shared_experts) == (4, 2, 1)
    assert (configs["esm"].vocab_size, configs["esm"].pad_token_id) == (256, 1)
    assert configs["lfm2_moe"].layer_types == ["full_attention"] * 2 == configs["lfm2"].layer_types
    record = sweep.sweep_one("ministral", "float32", tmp_path)
    assert record["stage"] == "done" and record["validated"], record.get("error")
    assert record["fused_norms"] == record["norms_in_output"] == 5


def test_recurrent_stacks_keep_their_pass_count_in_step(sweep):
    """HRM counts every pass of its stacks in num_hidden_layers (128: 16 layers a stack, times 2 high
    cycles, times 3 low cycles plus one). Shrunk, the stacks have 2 layers and the count is 16."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("hrm_text")
    assert (config.num_layers_per_stack, config.num_hidden_layers) == (16, 128)
    sweep.shrink(config)
    assert (config.num_layers_per_stack, config.num_hidden_layers) == (2, 2 * 2 * (3 + 1))


def test_a_hybrid_keeps_a_layer_of_each_type_and_its_per_layer_settings(sweep):
    """Qwen3-Next is three linear-attention layers to one full: the two kept are one of each.
    Gemma 4's full-attention layers have their own head size (a per-layer setting, unreadable
    globally): shrunk, and given again to the layer kept."""
    from transformers import AutoConfig

    hybrid, gemma4 = AutoConfig.for_model("qwen3_next"), AutoConfig.for_model("gemma4_text")
    for config in (hybrid, gemma4):
        sweep.shrink(config)
    assert hybrid.num_hidden_layers == 2 and hybrid.layer_types == ["linear_attention", "full_attention"]
    assert gemma4.layer_types == ["sliding_attention", "full_attention"] and gemma4.hidden_size == 64
    assert [layer.head_dim for layer in gemma4.per_layer_config] == [16, 16]


def test_every_held_config_is_shrunk_unless_only_the_text_config_runs(sweep):
    """CLIP's vision tower is shrunk with its text model; `sub_configs=False` leaves it whole. The
    settings a type is tried with are only those that make another config: one for LLaMA (no
    sub-config, no layer types), the text config alone after every config for SigLIP, and the
    first two layers after a layer of each type for Zamba2."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("clip")
    sweep.shrink(config)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (64, 2)
    assert config.text_config.hidden_size == 64
    whole = AutoConfig.for_model("clip")
    sweep.shrink(whole, sub_configs=False)
    assert (whole.vision_config.hidden_size, whole.vision_config.num_hidden_layers) == (768, 12)
    assert whole.text_config.hidden_size == 64
    assert sweep.shrink_attempts("llama") == [(True, True)]
    assert sweep.shrink_attempts("siglip") == [(True, True), (True, False)]
    assert sweep.shrink_attempts("zamba2") == [(True, True), (False, True)]


def test_a_row_gives_the_reason_of_the_settings_that_got_furthest(sweep, tmp_path):
    """OneFormer with every config shrunk fails to build (an IndexError in its model code); with
    only its text config shrunk it builds and stops at its forward, which wants task inputs. That
    reason, the further one, is the row's."""
    with pytest.raises(IndexError):
        sweep.small_model_run("oneformer", "float32", {}, mixed_layers=True, sub_configs=True)
    record = sweep.sweep_one("oneformer", "float32", tmp_path)
    assert record["stage"] == "forward" and "task_inputs" in record["error"]


def test_a_hybrid_that_wants_its_first_two_layers_gets_them(sweep, tmp_path):
    """Zamba2's model fails to run with a Mamba layer and its hybrid layer kept: the sweep builds
    it again with its first two layers, as a model with no layer types gets."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("zamba2")
    assert sweep.kept_layers(config, sweep.layer_count(config)) != [0, 1]
    with pytest.raises(RuntimeError, match="must match the size"):  # a layer of each type: it cannot run
        sweep.small_model_run("zamba2", "float32", {}, mixed_layers=True)
    record = sweep.sweep_one("zamba2", "float32", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["validated"] and record["fused_norms"] == record["norms_in_output"] > 0


def test_per_stage_widths_and_heads_follow_the_shrunk_stages(sweep):
    """ConvNeXt's stage count is its num_hidden_layers: its per-stage widths and depths (tuples) are
    cut with it. Swin's per-stage heads (3, 6, 12, 24) are scaled with its first stage's width, so
    each still divides its stage; Hiera's (1, 2, 4, 8) already do, and stay."""
    from transformers import AutoConfig

    convnext, swin, hiera = (AutoConfig.for_model(name) for name in ("convnext", "swin", "hiera"))
    for config in (convnext, swin, hiera):
        sweep.shrink(config)
    assert convnext.num_stages == len(convnext.hidden_sizes) == len(convnext.depths) == 2
    assert swin.num_layers == len(swin.depths) == len(swin.num_heads) == 2 and swin.embed_dim == 64
    assert all(swin.embed_dim * 2 ** stage % heads == 0 for stage, heads in enumerate(swin.num_heads))
    assert swin.num_heads == (2, 4)
    assert hiera.num_heads == (1, 2, 4, 8)


def test_multimodal_rope_sections_fit_the_smaller_heads(sweep):
    """Qwen2-VL's rotary sections (16, 24, 24) are written for 64 frequencies; shrunk to 16-wide
    heads it has 8, and its forward fails until they are scaled to fit. GLM-4V's MoE text model
    rotates half of its heads: 4 frequencies, (8, 12, 12) rounded to sum to them."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("qwen2_vl_text")
    sweep.shrink(config)
    model = AutoModel.from_config(config).eval()
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        model(input_ids=ids)
    sweep.fit_multimodal_rope(model)
    assert model.rotary_emb.mrope_section == [2, 3, 3]
    assert model(input_ids=ids).last_hidden_state.shape == (1, 8, 64)
    rope = torch.nn.Module()
    rope.mrope_section, rope.inv_freq = [8, 12, 12], torch.ones(4)
    sweep.fit_multimodal_rope(rope)
    assert sum(rope.mrope_section) == 4 and all(n >= 1 for n in rope.mrope_section)


def test_a_half_precision_model_is_swept_and_validated(sweep, tmp_path):
    """`--dtype float16`: the model built, exported and compared in fp16, within fp16's graph tolerance."""
    from normops.tolerances import GRAPH

    record = sweep.sweep_one("llama", "float16", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["dtype"] == "float16" and record["validated"] and record["fused_norms"] == 5
    # fp16's rounding shows: the fused graph is not bit-equal, and differs past fp32's tolerance
    assert record["max_abs"] > GRAPH["float32"].atol


def test_a_bfloat16_model_is_validated_in_its_tensorrt_form_on_the_evaluator(sweep, tmp_path):
    """`--dtype bfloat16`: ONNX Runtime's CPU provider has no bfloat16 kernels, so the graph TensorRT
    would build (normfuse ops) is compared with the export on onnx's reference evaluator, within
    bfloat16's graph tolerance."""
    import onnx

    from normops.tolerances import GRAPH

    record = sweep.sweep_one("llama", "bfloat16", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["dtype"] == "bfloat16" and record["validated"] and record["fused_norms"] == 5
    assert record["max_abs"] > GRAPH["float32"].atol  # bfloat16's rounding shows
    fused = onnx.load(str(tmp_path / "fused-tensorrt.onnx"), load_external_data=False)
    assert sorted(n.op_type for n in fused.graph.node if n.domain == "normfuse") == ["AddRMSNorm"] * 4 + ["RMSNorm"]
    assert fused.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64  # ids in, bf16 inside
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in fused.graph.initializer)


@pytest.mark.slow  # 12 s; export.precision_check's own tests (tests/test_precision_check.py) run by default
def test_a_bfloat16_export_off_by_its_own_rounding_is_validated_against_float32(sweep, tmp_path):
    """CPM-Ant in bfloat16: its fused graph differs from the export by more than the tolerance,
    though each fused norm is right; run in float32, the export is further off than the fused graph,
    which is within tolerance of it. The row says so (verdict, diagnosis, the Markdown's list) and
    keeps the difference from the bfloat16 export as its max abs."""
    from normops.tolerances import GRAPH

    record = sweep.sweep_one("cpmant", "bfloat16", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["validated"] and record["judged_against_float32"] == ["1x16"]
    assert sweep.verdict(record) == "ok against float32"
    assert record["max_abs"] > GRAPH["bfloat16"].atol  # against the bfloat16 export
    assert "5 of 5 within one op's tolerance" in record["diagnosis"]
    assert "the fused graph is within bfloat16's tolerance of the float32 run" in record["diagnosis"]
    text = sweep.markdown([{**record, "type": "cpmant"}], "bfloat16", [])
    assert "| ok against float32 | 1 |" in text and "Failed validations" not in text
    assert text.endswith(f"- cpmant at {record['diagnosis']}\n")


def test_a_mixture_of_experts_exports_with_dynamic_shapes(sweep, tmp_path):
    """Mixtral's experts run batched (each token's expert weights gathered): no data-dependent
    loop, so torch exports it with dynamic batch and sequence, and every norm is fused."""
    record = sweep.sweep_one("mixtral", "float32", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["shapes"] == "dynamic" and record["validated"]
    assert record["fused_norms"] == record["norms_in_output"] == 5


def test_a_time_series_model_is_given_its_context_window(sweep, tmp_path):
    """PatchTSMixer forecasts from past_values: its whole context (32 steps) of its one channel,
    batch dynamic; its 4 LayerNorms (3 after a residual Add) are fused and validated."""
    record = sweep.sweep_one("patchtsmixer", "float32", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["inputs"] == {"past_values": [2, 32, 1]} and record["shapes"] == "dynamic"
    assert record["validated"] and record["fused_norms"] == record["norms_in_output"] == 4
    assert record["fused"]["tensorrt"] == {"AddLayerNorm": 3, "LayerNorm": 1}


def test_a_vision_tower_fed_a_patch_grid_is_swept_with_the_grid_fixed(sweep, tmp_path):
    """Qwen2.5-VL's vision tower takes flattened patches and the grid they tile, from whose values
    it computes rotary positions and windows: dynamo cannot export that, so the grid is fixed and
    the TorchScript exporter traces it. Its 4 norms in the output (the fifth, the merger's, feeds
    nothing the last hidden state needs) are fused and validated."""
    record = sweep.sweep_one("qwen2_5_vl_vision", "float32", tmp_path)
    assert record["stage"] == "done", record.get("error")
    grid = list(sweep.GRID)
    assert record["inputs"] == {"hidden_states": [grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14]}
    assert record["fixed"] == {"grid_thw": [grid]}
    assert record["shapes"] == "TorchScript" and record["validated"]
    assert record["fused_norms"] == record["norms_in_output"] == 4


def test_a_model_fed_an_image_as_a_sequence_of_patches_gets_one_images_patches(sweep, tmp_path):
    """SigLIP2's NaFlex vision tower takes flattened patches with their grid and mask: it gets one
    image's patches, the grid and mask fixed in the export, and is swept to the end."""
    record = sweep.sweep_one("siglip2_vision_model", "float32", tmp_path)
    assert record["stage"] == "done" and record["validated"], record.get("error")
    rows, columns = sweep.GRID[1:]
    assert record["inputs"] == {"pixel_values": [1, rows * columns, 3 * 16 * 16]}
    assert record["fixed"]["spatial_shapes"] == [[rows, columns]]
    assert record["fused_norms"] == record["norms_in_output"] == 5


def test_patches_placed_by_position_ids_tile_whole_pooling_squares(sweep):
    """Gemma 4's vision tower places each patch by its (x, y) and pools 3 x 3 squares of them: the
    grid's sides are rounded up to multiples of 3, and every patch gets its place, row by row."""
    from types import SimpleNamespace

    import torch

    tower = SimpleNamespace(patch_size=16, pooling_kernel_size=3)
    ((inputs, shapes, axes, fixed),) = sweep.naflex_inputs(tower, {"pixel_values": None, "pixel_position_ids": None},
                                                           256, torch.float16)
    side = 9 if sweep.GRID[1:] == (8, 8) else None
    assert inputs["pixel_values"].shape == (1, side * side, 3 * 16 * 16) and inputs["pixel_values"].dtype == torch.float16
    positions = fixed["pixel_position_ids"][0]
    assert positions.shape == (side * side, 2)
    assert positions[1].tolist() == [1, 0] and positions[side].tolist() == [0, 1] and positions[-1].tolist() == [side - 1, side - 1]
    assert axes == {"pixel_values": {}} and shapes == f"1x{side * side}"


def test_an_export_with_no_dynamic_axis_is_called_static(sweep, tmp_path):
    """Inputs with no dynamic axis (a fixed patch grid's) export static, and the row says so."""
    import torch

    class LinearNorm(torch.nn.Module):  # called by keyword and returning a tuple, as a transformers model
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))

        def forward(self, x):
            return (self.inner(x),)

    wrapped = sweep.first_output(LinearNorm().eval(), ["x"])
    inputs = {"x": torch.randn(4, 8)}
    assert sweep.export(wrapped, inputs, {"x": {}}, tmp_path / "static.onnx") == "static"
    assert sweep.export(wrapped, inputs, {"x": {0: "batch"}}, tmp_path / "dynamic.onnx") == "dynamic"


def test_only_layer_and_rms_kinds_of_norm_are_counted(sweep):
    import torch

    class LlamaLikeRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    class RobertaPreLayerNormOutput(torch.nn.Module):  # a block named after its model
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(8, 8)

    weight_normed = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(8, 8, 3))
    counted = [torch.nn.LayerNorm(8), torch.nn.RMSNorm(8), LlamaLikeRMSNorm()]
    not_counted = [torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm1d(8),
                   RobertaPreLayerNormOutput(), torch.nn.Linear(8, 8), weight_normed.parametrizations.weight[0]]
    assert [sweep.is_norm_module(m) for m in counted + not_counted] == [True] * 3 + [False] * 6


def test_an_unfinished_sweep_says_so_and_update_finishes_it(sweep, tmp_path):
    """A sweep writes its records as each type finishes, listing the rest as unswept; `--update`
    sweeps those, and the types whose norms were counted, each once (DETR is both here: an update
    stopped before it re-swept DETR, whose model needs `timm`, which the install lacks, so a sweep
    of it stops at once, at "model")."""
    without_timm()
    out = tmp_path / "sweep.json"
    kept = {"type": "zamba", "dtype": "float32", "stage": "model", "error": "kept"}
    counted = {"type": "detr", "dtype": "float32", "stage": "export", "norm_calls": 5, "error": "stopped"}
    out.write_text(json.dumps({"versions": {}, "dtype": "float32", "unswept": ["detr"], "records": [counted, kept]}))
    assert "**Unfinished: 1 types to sweep**" in sweep.markdown([kept], "float32", ["detr"])
    done = subprocess.run([sys.executable, str(SCRIPT), "--update", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["unswept"] == [] and [(r["type"], r["stage"]) for r in payload["records"]] == [
        ("detr", "model"), ("zamba", "model")]
    assert "timm" in payload["records"][0]["error"]


def without_timm() -> None:
    """The `--update` tests sweep DETR for a row that stops at once, which it does without timm."""
    import importlib.util

    if importlib.util.find_spec("timm"):
        pytest.skip("timm is installed, so DETR builds: the test needs a type that stops at once")


def test_update_sweeps_the_types_given_into_the_records(tmp_path):
    without_timm()
    out = tmp_path / "sweep.json"
    out.write_text(json.dumps({"versions": {}, "dtype": "float32",
                               "records": [{"type": "zamba", "dtype": "float32", "stage": "model", "error": "kept"}]}))
    # DETR's model needs `timm`, which the install lacks: its row stops at once, at "model"
    done = subprocess.run([sys.executable, str(SCRIPT), "--update", "--types", "detr", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert [(r["type"], r["stage"]) for r in records] == [("detr", "model"), ("zamba", "model")]
    assert records[1]["error"] == "kept"
    missing = subprocess.run([sys.executable, str(SCRIPT), "--update", "--json", str(tmp_path / "none.json")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "--update needs an existing --json file" in missing.stderr


def test_a_bfloat16_torch_script_export_gets_onnxs_number_for_bfloat16(sweep, tmp_path):
    """TorchScript's exporter casts a given attention scale to a bfloat16 query's type with torch's
    number for bfloat16 (15), COMPLEX128 in ONNX, and its constant folding stops on it. The sweep
    exports unfolded and renumbers those Casts: the graph runs, as torch does."""
    import numpy as np
    import onnx
    import torch

    from export.rewrite.evaluate import run_model
    from normops.tolerances import GRAPH

    class ScaledAttention(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.25)

    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    path = tmp_path / "attention.onnx"
    sweep.torch_script_export(ScaledAttention(), (q,), path, {"input_names": ["q"], "output_names": ["output"]})
    model = onnx.load(str(path))
    casts = [a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.COMPLEX128 not in casts and onnx.TensorProto.BFLOAT16 in casts
    (got,) = run_model(model, {"q": q.float().numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(16))})
    expected = torch.nn.functional.scaled_dot_product_attention(*(q.double(),) * 3, scale=0.25).numpy()
    tolerance = GRAPH["bfloat16"]
    assert np.allclose(got.astype(np.float64), expected, atol=tolerance.atol, rtol=tolerance.rtol)


def test_a_tensor_check_exports_with_dynamic_shapes_and_leaves_no_node(sweep, tmp_path):
    """`torch._check_tensor_all` (transformers' `torch_compilable_check`) leaves `aten._is_all_true`
    in the exported program, which torch's exporter has no ONNX for. The sweep gives it one; the
    check's result feeds nothing, so the graph keeps only what the model computes."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    class Checked(torch.nn.Module):  # takes *values, as `first_output`'s wrapper does
        def forward(self, *values):
            x, spatial_shapes = values
            torch._check_tensor_all((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum() == x.shape[1])
            return x * 2

    x, shapes = torch.randn(2, 6, 4), torch.tensor([[2, 3]])
    path = tmp_path / "checked.onnx"
    how = sweep.export(Checked(), {"x": x, "spatial_shapes": shapes}, {"x": {0: "batch"}, "spatial_shapes": {}}, path)
    assert how == "dynamic"
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Mul"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wider = np.random.default_rng(0).standard_normal((3, 6, 4)).astype(np.float32)
    feeds = {i.name: value for i, value in zip(session.get_inputs(), (wider, shapes.numpy()))}
    (out,) = session.run(None, feeds)
    assert np.array_equal(out, wider * 2)


def test_a_complex_rotary_embedding_exports_with_dynamic_shapes(sweep, tmp_path):
    """Llama 4's and DeepSeek V2's rotary embeddings multiply by complex factors they unsqueeze,
    which torch's exporter has no complex translation of. With the sweep's, the export runs the
    same arithmetic as torch at another batch size, and the exporter's registry is left as it was."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from torch.onnx._internal.exporter import _registration

    class Rotary(torch.nn.Module):
        def forward(self, *values):
            (x,) = values  # batch, sequence, heads, 2 x pairs
            angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.1, 0.01])
            factors = torch.polar(torch.ones_like(angles), angles)  # sequence, pairs
            pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
            rotated = pairs * factors.unsqueeze(-2).unsqueeze(0)  # one axis counted from the back, one from the front
            return torch.view_as_real(rotated).flatten(3)

    build = _registration.ONNXRegistry.from_torchlib
    x = torch.randn(2, 5, 4, 6)
    path = tmp_path / "rotary.onnx"
    assert sweep.export(Rotary(), {"x": x}, {"x": {0: "batch", 1: "sequence"}}, path) == "dynamic"
    assert _registration.ONNXRegistry.from_torchlib == build
    wider = torch.randn(3, 7, 4, 6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: wider.numpy()})
    np.testing.assert_allclose(out, Rotary()(wider).numpy(), rtol=1e-5, atol=1e-5)


def test_a_half_precision_model_falls_back_to_torch_script_with_eager_attention(sweep, tmp_path):
    """Marian in fp16: dynamo stops on its encoder's data-dependent `isfinite` clamp, so TorchScript
    exports it. TorchScript's SDPA would run the attention after a boolean mask in float32 (a graph
    ONNX Runtime refuses); with eager attention the export loads, and is rewritten and validated."""
    record = sweep.sweep_one("marian", "float16", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["shapes"] == "TorchScript"
    assert record["validated"] and record["fused_norms"] == record["norm_calls"] == 10


@pytest.mark.slow  # 12 s; the evaluator's path is swept by default in bf16, MissingKernel tested in test_missing_kernel.py
def test_a_model_onnx_runtime_lacks_a_kernel_for_is_validated_on_the_evaluator(sweep, tmp_path):
    """JetMoE in fp16 combines its experts with a ScatterND adding float16, which ONNX Runtime's CPU
    provider refuses: its tensorrt form is validated on onnx's reference evaluator instead, and the
    row and the Markdown say why."""
    record = sweep.sweep_one("jetmoe", "float16", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert "ScatterND" in record["on_evaluator"] and record["validated"]
    assert record["fused_norms"] == record["norms_in_output"] == 5
    text = sweep.markdown([{**record, "type": "jetmoe"}], "float16", [])
    assert "- jetmoe: CPU execution provider: MLFloat16 data type is not supported with ScatterND" in text


def layer_norm_module(width: int, times: float = 1.0):
    """A LayerNorm taking its input as the sweep's wrapper does (`first_output`: *values), its output
    multiplied by `times` where that is not 1 (a constant the exporter's optimiser folds): small
    enough to export every way in seconds."""
    import torch

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(width)

        def forward(self, *values):
            (x,) = values
            return self.norm(x) if times == 1.0 else self.norm(x) * times

    return Norm().eval()


def test_each_export_mode_hands_over_to_the_next(sweep, tmp_path):
    """An export that does not load or run is exported again the next way: dynamic, then dynamic
    without the dynamo exporter's optimiser (a graph it broke), then static, then TorchScript. Each
    way's graph is what it says: the unoptimised one keeps the exporter's raw ops, the static one
    has no named axis, TorchScript's names its nodes by module path."""
    import onnx
    import torch

    inputs, axes = {"x": torch.randn(2, 5, 16)}, {"x": {0: "batch", 1: "sequence"}}
    graphs = {}
    for after in (None, *sweep.EXPORT_MODES[:-1]):
        path = tmp_path / f"{after}.onnx"
        mode = sweep.export(layer_norm_module(16, times=2.0), inputs, axes, path, after)
        assert mode == sweep.EXPORT_MODES[0 if after is None else sweep.EXPORT_MODES.index(after) + 1]
        graphs[mode] = onnx.load(str(path)).graph
    dims = {mode: [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] for mode, g in graphs.items()}
    assert dims["dynamic"] == dims["dynamic unoptimised"] == ["batch", "sequence", ""]
    assert dims["static"] == dims["TorchScript"] == ["", "", ""]
    assert len(graphs["dynamic unoptimised"].node) > len(graphs["dynamic"].node)
    assert any(n.name.startswith("/norm/") for n in graphs["TorchScript"].node)


def test_only_an_export_that_does_not_load_or_run_is_exported_again(sweep, tmp_path):
    """The export's own failure to load or run at another size is mended by another way of
    exporting; the fused graph's failure, or a model whose outputs are random, is not."""
    from export.errors import NormfuseError, RunFailure

    exported = tmp_path / "model.onnx"
    assert sweep.does_not_load_or_run(RunFailure(f"{exported}: ONNX Runtime failed to run it on x [1, 3]: ..."), exported)
    assert sweep.does_not_load_or_run(NormfuseError(f"{exported}: ONNX Runtime cannot load it: ..."), exported)
    assert not sweep.does_not_load_or_run(RunFailure(f"{tmp_path / 'fused.onnx'}: ONNX Runtime failed ..."), exported)
    assert not sweep.does_not_load_or_run(
        NormfuseError(f"{exported}: its outputs change from run to run, so no comparison can pass"), exported)


def test_an_attempt_leaves_nothing_of_the_one_before(sweep, tmp_path):
    """Each export, rewrite and validation writes its record afresh: a field an earlier attempt set
    (validated on the evaluator, a fusion count) does not outlive it."""
    import torch

    record = {"type": "t", "dtype": "float32", "on_evaluator": "an earlier attempt's", "fused_norms": 99,
              "export_failed": {"dynamic": "RunFailure: an earlier attempt's"}}
    sweep.rewrite_and_validate(record, layer_norm_module(16), {"x": torch.randn(2, 5, 16)}, {"x": {0: "batch", 1: "sequence"}},
                               "1x5,2x7", tmp_path / "model.onnx", tmp_path, after="dynamic")
    assert "on_evaluator" not in record and record["fused_norms"] == 1 and record["validated"]
    assert record["export"] == "dynamic unoptimised" and record["export_failed"] == {"dynamic": "RunFailure: an earlier attempt's"}


@pytest.mark.slow  # 25 s: one more export and validation than a type that runs the first way
def test_an_export_that_does_not_load_is_exported_again_without_the_optimiser(sweep, tmp_path):
    """Gemma 4's audio tower: onnxscript's optimiser drops a Min's output the graph still reads, so
    ONNX Runtime refuses the dynamic export; exported again unoptimised, it loads, and every norm
    is fused and validated at two dynamic shapes."""
    record = sweep.sweep_one("gemma4_audio", "float32", tmp_path)
    assert record["stage"] == "done", record.get("error")
    assert record["export"] == "dynamic unoptimised" and record["shapes"] == "dynamic"
    assert "cannot load it" in record["export_failed"]["dynamic"]
    assert record["validated"] and record["fused_norms"] == record["norms_in_output"] == 20
