"""Hugging Face transformers models as torch's exporter writes them: every norm is fused, and the
fused graph matches the exported one on ONNX Runtime. The models are tiny and randomly
initialised from a config (nothing is downloaded); their modelling code is the real one, so the
norms are spelled out the way each architecture writes them (LLaMA's fp32 RMSNorm with casts,
Gemma's `1 + weight`, Qwen3's per-head q/k norms, GPT-2's pre-LN and BERT's post-LN LayerNorm,
GPT-NeoX's parallel norms) and fed by token
ids, which validation keeps inside the embedding table.

Each export takes seconds: five fp32 architectures run by default; four more, and fp16/bf16, under -m slow.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import onnx
import pytest
from test_rewrite_exports import loose_scales

from export.rewrite import rewrite_file
from export.validate import Side, compare, model_dtype

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS = 2
BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_is_not_left_on_the_import_path():
    """bench/kernels.py is a script whose name is the `kernels` package's, which transformers imports
    when it is installed: with bench/ on sys.path every model build here failed (ImportError)."""
    assert str(BENCH) not in sys.path
    assert "kernels" not in sys.modules or Path(sys.modules["kernels"].__file__ or "/").parent != BENCH

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)


def build(arch: str):
    t = transformers
    if arch == "llama":
        return t.LlamaModel(t.LlamaConfig(**COMMON))
    if arch == "qwen3":
        return t.Qwen3Model(t.Qwen3Config(head_dim=16, **COMMON))
    if arch == "gemma":
        return t.GemmaModel(t.GemmaConfig(head_dim=16, **COMMON))
    if arch == "gpt2":
        return t.GPT2Model(t.GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=100, n_positions=64))
    if arch == "opt":
        return t.OPTModel(t.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=64))
    if arch == "bert":
        return t.BertModel(t.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, vocab_size=100, max_position_embeddings=64))
    if arch == "neox":
        return t.GPTNeoXModel(t.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                              num_attention_heads=4, vocab_size=100, max_position_embeddings=64))
    if arch == "falcon":
        return t.FalconModel(t.FalconConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                            vocab_size=100))
    if arch == "gemma2":
        return t.Gemma2Model(t.Gemma2Config(head_dim=16, **COMMON))
    if arch == "cohere":
        return t.CohereModel(t.CohereConfig(**COMMON))
    if arch == "olmo2":
        return t.Olmo2Model(t.Olmo2Config(**COMMON))
    if arch == "olmo":
        return t.OlmoModel(t.OlmoConfig(**COMMON))
    if arch == "nemotron":
        return t.NemotronModel(t.NemotronConfig(**COMMON))
    if arch == "persimmon":
        return t.PersimmonModel(t.PersimmonConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"},
                                                  qk_layernorm=True))
    if arch == "phi":
        return t.PhiModel(t.PhiConfig(**COMMON))
    if arch == "modernbert":
        return t.ModernBertModel(t.ModernBertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                                    num_attention_heads=4, vocab_size=100, max_position_embeddings=64,
                                                    global_attn_every_n_layers=1, pad_token_id=0))
    if arch == "gemma3":
        return t.Gemma3TextModel(t.Gemma3TextConfig(head_dim=16, **COMMON))
    if arch == "stablelm":
        return t.StableLmModel(t.StableLmConfig(qk_layernorm=True, **COMMON))
    if arch == "glm4":
        return t.Glm4Model(t.Glm4Config(head_dim=16, pad_token_id=0, **COMMON))
    if arch == "granite":
        return t.GraniteModel(t.GraniteConfig(**COMMON))
    if arch == "starcoder2":
        return t.Starcoder2Model(t.Starcoder2Config(**COMMON))
    if arch == "bloom":
        return t.BloomModel(t.BloomConfig(hidden_size=64, n_layer=LAYERS, n_head=4, vocab_size=100))
    if arch == "mpt":
        return t.MptModel(t.MptConfig(d_model=64, n_heads=4, n_layers=LAYERS, vocab_size=100, max_seq_len=64))
    if arch == "smollm3":
        return t.SmolLM3Model(t.SmolLM3Config(pad_token_id=0, **COMMON))
    if arch == "exaone4":
        return t.Exaone4Model(t.Exaone4Config(head_dim=16, **COMMON))
    if arch == "lfm2":
        return t.Lfm2Model(t.Lfm2Config(layer_types=["conv", "full_attention"], **COMMON))
    if arch == "olmo3":
        return t.Olmo3Model(t.Olmo3Config(**COMMON))
    if arch == "helium":
        return t.HeliumModel(t.HeliumConfig(head_dim=16, **COMMON))
    if arch == "dory":
        return t.DoryModel(t.DoryConfig(**COMMON))
    if arch == "clip-text":
        return t.CLIPTextModel(t.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                                num_attention_heads=4, vocab_size=100, max_position_embeddings=64))
    raise ValueError(arch)


class LastHiddenState(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        if isinstance(self.model, (transformers.BertModel, transformers.CLIPTextModel)):  # encoders: no cache to turn off
            return self.model(input_ids=input_ids).last_hidden_state
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def export(arch: str, dtype: str, directory: Path, exporter: str = "dynamo") -> Path:
    """torch.export's exporter (opset 18; "dynamo-unoptimised": with its optimiser off, as users
    run it when the optimiser is slow or fails on a large model), or TorchScript's (opset 17), the
    one Optimum uses."""
    torch.manual_seed(0)
    model = build(arch)
    with torch.no_grad():  # as in a trained model, no two norms share weights (else the exporter merges them)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = LastHiddenState(model.eval().to(getattr(torch, dtype)))
    path = directory / f"{arch}-{dtype}-{exporter}.onnx"
    ids = torch.randint(0, 100, (2, 16))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):
            torch.onnx.export(model, (ids,), str(path), dynamo=True, opset_version=18, input_names=["input_ids"],
                              output_names=["last_hidden_state"],
                              dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}},
                              optimize=exporter == "dynamo")
        else:
            torch.onnx.export(model, (ids,), str(path), dynamo=False, opset_version=17, input_names=["input_ids"],
                              output_names=["last_hidden_state"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}})
    return path


# arch -> {target: fused norms by op}. Each decoder layer has two norms, each with the residual
# Add in front except the first layer's first (it reads the embeddings); the final norm follows
# the last residual Add. Qwen3 also normalises q and k per head (over head_dim, the last axis):
# two plain RMSNorms a layer; Gemma2 normalises the attention and MLP outputs before their Adds:
# the same count. The onnxruntime target leaves a native LayerNormalization without an Add as it
# is (one op already). BERT is post-LN: two Add+LayerNorm a layer, and an embedding LayerNorm whose
# Add broadcasts the position embeddings (not an equal-shape residual, so not fused with it).
# GPT-NeoX runs attention and MLP in parallel from two norms of the same input: one of them takes
# the Add. Falcon's parallel layers share one norm. OPT reshapes its residual stream between the
# Adds and the norms ([batch, seq, hidden] <-> [tokens, hidden]); the Adds are fused through those
# Reshapes, and its embedding sum is an Add of equal shapes too. Cohere's parallel layers share one
# bias-free LayerNorm computed in fp32. OLMo-2 normalises q and k over the whole hidden size and the
# attention and MLP outputs before their Adds (four plain RMSNorms a layer); only the final norm has
# an Add in front. OLMo's LayerNorms have no weight or bias, Nemotron's scale by 1 + weight, ModernBERT's
# have no bias: each is a native LayerNormalization, which the onnxruntime target leaves alone where no
# Add precedes it. Persimmon also normalises q and k per head (two plain LayerNorms a layer); Phi runs
# attention and MLP in parallel from one norm a layer.
EXPECTED = {
    "llama": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}, "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}},
    "gemma": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}, "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}},
    "qwen3": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 2 * LAYERS},
              "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 2 * LAYERS}},
    "gpt2": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "opt": {"tensorrt": {"AddLayerNorm": 2 * LAYERS + 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS + 1}},
    "bert": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "neox": {"tensorrt": {"AddLayerNorm": LAYERS, "LayerNorm": LAYERS + 1}, "onnxruntime": {"AddLayerNorm": LAYERS}},
    "falcon": {"tensorrt": {"AddLayerNorm": LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": LAYERS}},
    "gemma2": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 2 * LAYERS},
               "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 2 * LAYERS}},
    "cohere": {"tensorrt": {"AddLayerNorm": LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": LAYERS, "LayerNorm": 1}},
    "olmo2": {"tensorrt": {"AddRMSNorm": 1, "RMSNorm": 4 * LAYERS}, "onnxruntime": {"AddRMSNorm": 1, "RMSNorm": 4 * LAYERS}},
    "olmo": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "nemotron": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "modernbert": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "persimmon": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1 + 2 * LAYERS},
                  "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "phi": {"tensorrt": {"AddLayerNorm": LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": LAYERS}},
    # Gemma3 has Gemma2's four norms a layer and Qwen3's per-head q/k norms; StableLM's per-head q/k
    # LayerNorms are one nn.LayerNorm per head (4 q heads and 2 kv heads a layer); GLM-4 normalises
    # the attention and MLP outputs before their Adds; BLOOM normalises the embeddings too; EXAONE-4
    # and OLMo-3 are OLMo-2's post-norm layout with per-head q/k norms; LFM2 has q/k norms in its
    # attention layer only. Helium's RMSNorm has epsilon 1e-8, which torch's optimiser removes as an
    # Add of zero: its norms are fused with epsilon 0 (see test_rewrite_patterns.py).
    "gemma3": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 4 * LAYERS},
               "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 4 * LAYERS}},
    "stablelm": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1 + 6 * LAYERS}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "glm4": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 2 * LAYERS},
             "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1 + 2 * LAYERS}},
    "granite": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}, "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}},
    "starcoder2": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "bloom": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 2}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "mpt": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    "smollm3": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}, "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}},
    "exaone4": {"tensorrt": {"AddRMSNorm": 1, "RMSNorm": 4 * LAYERS}, "onnxruntime": {"AddRMSNorm": 1, "RMSNorm": 4 * LAYERS}},
    "lfm2": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 3}, "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 3}},
    "olmo3": {"tensorrt": {"AddRMSNorm": 1, "RMSNorm": 4 * LAYERS}, "onnxruntime": {"AddRMSNorm": 1, "RMSNorm": 4 * LAYERS}},
    "helium": {"tensorrt": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}, "onnxruntime": {"AddRMSNorm": 2 * LAYERS, "RMSNorm": 1}},
    "clip-text": {"tensorrt": {"AddLayerNorm": 2 * LAYERS, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 2 * LAYERS}},
    # Dory (nGPT) keeps every hidden state at L2 norm 1: x * rsqrt(sum(x^2) + eps), the RMSNorm with
    # epsilon eps / n and scale 1 / sqrt(n), after every embedding, sublayer, per-head q and k, and
    # residual interpolation (16 a layer); 35 at 2 layers, where the exporter merges two of one value
    "dory": {"tensorrt": {"AddRMSNorm": 10, "RMSNorm": 25}, "onnxruntime": {"AddRMSNorm": 10, "RMSNorm": 25}},
}


# onnx's reference evaluator cannot run these graphs at all, reference side included (BERT: its
# GatherElements of the token-type buffer fails inside numpy), so their tensorrt-target outputs
# are not compared here.
REFERENCE_EVALUATOR_FAILS = {"bert"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, dtype: str, exporter: str = "dynamo") -> Path:
        if (arch, dtype, exporter) not in cache:
            cache[(arch, dtype, exporter)] = export(arch, dtype, tmp_path_factory.mktemp(f"{arch}-{dtype}"), exporter)
        return cache[(arch, dtype, exporter)]

    return get


def check(exported, arch: str, dtype: str, tmp_path: Path, exporter: str = "dynamo") -> None:
    source = exported(arch, dtype, exporter)
    assert model_dtype(source) == dtype  # from the output: the only input is token ids
    for target, expected in EXPECTED[arch].items():
        fused = tmp_path / f"{arch}-{target}.onnx"
        report = rewrite_file(source, fused, target=target)
        assert report.counts == expected, (target, [r.reason for r in report.rejected])
        assert not report.rejected
        assert not loose_scales(onnx.load(str(fused), load_external_data=False)), target
        # onnxruntime target on ONNX Runtime's CPU provider; the tensorrt target on the onnx reference
        # evaluator, which runs the plugin ops through normops (ONNX Runtime has no bf16 MatMul on the CPU)
        backend = "ort-cpu" if target == "onnxruntime" and dtype != "bfloat16" else "onnx-reference"
        if backend == "onnx-reference" and arch in REFERENCE_EVALUATOR_FAILS:
            continue  # counted above; its numbers are checked through the onnxruntime target
        pairs = compare(Side(source, backend, "reference"), Side(fused, backend, "fused"), [(1, 16), (2, 64)], dtype)
        for pair in pairs:
            assert pair["passed"], (target, pair)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen3", "gpt2", "bert"])
def test_fp32_exports_are_fused_and_match(exported, arch, tmp_path):
    check(exported, arch, "float32", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["opt", "neox", "falcon", "gemma2", "cohere", "olmo2", "olmo", "nemotron", "modernbert",
                                  "persimmon", "phi"])
def test_more_fp32_architectures(exported, arch, tmp_path):
    check(exported, arch, "float32", tmp_path)


# Architectures added in transformers 4.4x-5.x. Not here, because torch.export or its ONNX conversion
# fails on them (not the rewriter): DeepSeek-V3, Llama 4, GPT-OSS, Qwen3-Next and Mamba.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3", "stablelm", "glm4", "granite", "starcoder2", "bloom", "mpt", "smollm3",
                                  "exaone4", "lfm2", "olmo3", "helium", "clip-text", "dory"])
def test_newer_fp32_architectures(exported, arch, tmp_path):
    check(exported, arch, "float32", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_half_precision_exports_are_fused_and_match(exported, arch, dtype, tmp_path):
    check(exported, arch, dtype, tmp_path)


# TorchScript (what Optimum's exporter runs) cannot export the decoder models here at all (their
# masks use aten::diff, which it has no symbolic for); the encoder and OPT it can.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_torchscript_exports_are_fused_and_match(exported, arch, tmp_path):
    check(exported, arch, "float32", tmp_path, exporter="torchscript")


# Unoptimised, torch writes each reduction's axes as a Reshape of constants, and Gemma2's masks
# hold Constants of empty lists (value_ints=[]): every norm is still fused.
@pytest.mark.parametrize("arch", ["gemma2"])
def test_unoptimised_dynamo_exports_are_fused_and_match(exported, arch, tmp_path):
    check(exported, arch, "float32", tmp_path, exporter="dynamo-unoptimised")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gpt2", "olmo2", "neox", "phi"])
def test_more_unoptimised_dynamo_exports(exported, arch, tmp_path):
    check(exported, arch, "float32", tmp_path, exporter="dynamo-unoptimised")
