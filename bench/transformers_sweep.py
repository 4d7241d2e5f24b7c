"""The rewriter over every model type Hugging Face transformers knows: built small, exported,
rewritten and validated, one type a process.

    python bench/transformers_sweep.py [--types llama,t5,...] [--dtype float32|float16|bfloat16]
        [--jobs 2] [--timeout 300] [--json bench/results/transformers-sweep-float32.json]

For each base model type (transformers' MODEL_MAPPING_NAMES; all of them by default):
1. config: its default config, shrunk (hidden 64, 2 layers, 4 heads, vocabulary 256, 4 experts, ...),
   and so every config it holds (a vision tower's, an encoder's); where that model does not build
   or run, only its text config, then its first two layers (`shrink_attempts`);
2. model: built from it with random weights (nothing is downloaded), in `--dtype`, experts of a
   mixture run batched (exportable with dynamic shapes), multimodal rotary sections fitted to the
   smaller heads;
3. forward: one pass on random ids (`pixel_values` for a vision model, images or else frames of
   video; both ids and pixels for a text and image dual encoder; `input_values` (a waveform) or
   `input_features` (a spectrogram) for a speech model; `decoder_input_ids` too for an
   encoder-decoder; a vision tower taking a patch grid (Qwen2-VL's) gets the patches of one
   image, its grid fixed in the export; one taking an image as a sequence of patches, SigLIP2's
   NaFlex or Gemma 4's, gets those of one image, what places them fixed), counting the calls of every LayerNorm or RMSNorm kind of
   module (a class named "...Norm..." with no modules inside; batch, group, instance and weight
   norms not counted), and how many distinct norms the exported output depends on (autograd
   tells: a pooler's norm, or one on tokens the last layer drops, is left out of the export; two
   calls with equal weights on one tensor are one norm, and the exporter merges them); where no
   candidate input runs, the row's reason gives each one's error;
4. export: torch's dynamo exporter, batch and sequence dynamic, or static shapes where that fails,
   or the TorchScript exporter (static) where dynamo cannot export at all; around the exporters'
   own gaps: an ONNX translation of `aten._is_all_true` (`translations`), eager attention for a
   half-precision model TorchScript exports, ONNX's number for bfloat16 in its Casts
   (`torch_script_export`);
5. rewrite: for the `tensorrt` target (every norm, native ones too) and the `onnxruntime` target;
6. validate: the `onnxruntime` form against the export on ONNX Runtime's CPU provider
   (export.validate, the dtype's graph tolerance), at two shapes where they are dynamic. In
   bfloat16, which that provider has no kernels for, the `tensorrt` form (the graph TensorRT would
   build) against the export, both on onnx's reference evaluator (`onnx-reference`: reductions and
   matrix products in fp32, rounded to bfloat16, the fused ops by the float64 normops references).

Each type runs in a process of its own under `--timeout`, so one that hangs or crashes costs only
its row. A row reaches the stage where it stopped, with the one-line reason. `check` marks a model
whose `tensorrt` form has fewer fused norms than distinct norms in the output, with none
refused: the norm may be a kind the rewriter does not know; look at it. (A norm the output
depends on only through indices, as a top-k selection's, has no gradient and is not counted: it
can hide a miss.) More fusions than calls is common and right: norms written as functions
(FLA-style `l2norm` on queries and keys) have no module to count.

Writes the records (versions, every row, its seconds) as JSON, and the summary and rows of
exported models as Markdown beside it; the terminal gets the summary and the rows to look at.
The JSON is rewritten as each type finishes, listing the types not yet swept as `unswept`, so a
stopped sweep keeps its rows and `--update` finishes it (by default it sweeps the unswept types
and every type that got as far as counting its norms). bench/README.md says how the committed
sweep was run and how long it took.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ off the path: its kernels.py would stand in for the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

RESULT_MARK = "SWEEP-RESULT "

# speech inputs: a waveform of SAMPLES (wav2vec2's convolutions take 400 samples a frame, 320 apart),
# or a spectrogram of FRAMES (Whisper's encoder wants exactly twice its max_source_positions)
SAMPLES, FRAMES = 4000, 128
# a time series' context window: a model's whole context_length, if it takes no more (PatchTST: 32)
TIME_STEPS = 128

# config fields shrunk wherever a config has them (as integers); lists as long as the layers are cut too
SMALL = {"hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "embed_dim": 64,
         "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "num_decoder_layers": 2,
         "encoder_layers": 2, "decoder_layers": 2, "num_encoder_layers": 2,
         "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16,
         "intermediate_size": 128, "ffn_dim": 128, "d_ff": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "vocab_size": 256,
         "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2,
         "top_k": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
         "max_position_embeddings": 256, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
         "kv_lora_rank": 32, "q_lora_rank": 32, "num_kv_shared_layers": 0, "max_source_positions": FRAMES // 2,
         "rotary_dim": 8, "projection_size": 64,
         "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "laurel_rank": 8}
# (heads, head size, expansion) of state-space layers, by the names each family gives them
MAMBA_HEADS = (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
               ("n_mamba_heads", "mamba_headdim", "mamba_expand"), ("mamba_num_heads", "mamba_head_dim", "expand"))
# head counts given per stage of a hierarchical model (Swin: 3, 6, 12, 24 over widths 96 to 768)
HEAD_LISTS = ("num_heads", "num_attention_heads")
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
TEXT_SHAPES, VISION_SHAPES = "1x16,2x32", "1x16,2x16"
# a spectrogram is validated at its example's length only: some speech exports (Canary, Cohere-ASR)
# keep the frames axis dynamic, yet ONNX Runtime could not run them at 96 frames
WAVE_SHAPES, SPECTROGRAM_SHAPES = "1x3200,2x4000", f"1x{FRAMES},2x{FRAMES}"
# a vision tower fed flattened patches (Qwen2-VL's kind) gets one image of GRID (frames, rows,
# columns) patches: rows and columns a multiple of every spatial merge (2) and of Qwen2.5-VL's
# window (4 merged patches), fixed in the export since the tower computes its positions from them
GRID_NAMES, GRID = ("grid_thw", "image_grid_thw"), (1, 8, 8)
TORCHSCRIPT_OPSET = 18
BUILD_STAGES = ("config", "model", "forward")  # the stages small_model_run goes through, in order


def shrink(config, mixed_layers: bool = True, sub_configs: bool = True) -> None:
    """`config` made small in place, and its text_config, and with `sub_configs` every other config
    it holds (a vision tower's, an encoder's and a decoder's, SAM's mask decoder's): see SMALL. Two
    layers are kept: the first two, or with `mixed_layers` where `layer_types` varies the first
    and the first of another type (a hybrid keeps an attention layer and a linear one); per-layer
    settings (Gemma 4's global layers' head size) are shrunk and given again for the layers kept."""
    spec = vars(config).get("_heterogeneity_spec")
    per_layer = {i: dict(settings) for i, settings in spec.per_layer_overrides.items()} if spec else {}
    if spec:
        config.per_layer_config = None  # the global values readable while shrinking
    layers = layer_count(config)
    first_stage = getattr(config, "embed_dim", None)
    # MLA: head_dim is the rotary part (DeepSeek) or the whole query-key head (Mistral 4); it stays so
    mla = isinstance(getattr(config, "qk_rope_head_dim", None), int)
    head_dim_is = next((key for key in ("qk_rope_head_dim", "qk_head_dim")
                        if getattr(config, key, None) == getattr(config, "head_dim", None)), None) if mla else None
    kept = kept_layers(config, layers) if mixed_layers else [0, 1]
    # a model with a key and value head per query head keeps them so (SMALL's 2 would make it grouped)
    one_per_query = getattr(config, "num_key_value_heads", None) == getattr(config, "num_attention_heads", 0)
    for key, value in list(vars(config).items()):
        if layers and layers > 2 and isinstance(value, (list, tuple)) and len(value) == layers:
            # per-layer lists (layer types, sparsity) and per-stage ones (ConvNeXt's widths and depths,
            # whose stage count is its num_hidden_layers) follow the layers
            setattr(config, key, type(value)(value[i] for i in kept))
    for key, value in SMALL.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            set_field(config, key, value)
    for key in TOKEN_FIELDS:  # special tokens inside the smaller vocabulary
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= SMALL["vocab_size"]:
            setattr(config, key, 0)
    # per-stage heads that no longer divide the narrower stages are scaled with them (Swin's 3 into 64);
    # the first name only: the other may be an alias of it (Swin's attribute_map)
    stage_heads_key = next((k for k in HEAD_LISTS if isinstance(getattr(config, k, None), (list, tuple))), None)
    stage_heads = getattr(config, stage_heads_key) if stage_heads_key else ()
    if (isinstance(first_stage, int) and stage_heads and all(isinstance(h, int) for h in stage_heads)
            and config.embed_dim % stage_heads[0]):
        setattr(config, stage_heads_key,
                type(stage_heads)(max(1, round(h * config.embed_dim / first_stage)) for h in stage_heads))
    # MLA's latent keys and values come one per query head whatever its config says: grouping them
    # would repeat them past the query heads
    if (one_per_query or mla) and isinstance(getattr(config, "num_key_value_heads", None), int):
        set_field(config, "num_key_value_heads", config.num_attention_heads)
    if mla:
        qk_head_dim = getattr(config, "qk_nope_head_dim", 0) + config.qk_rope_head_dim
        for key, value in (("qk_head_dim", qk_head_dim),
                           ("head_dim", config.qk_rope_head_dim if head_dim_is == "qk_rope_head_dim" else
                            qk_head_dim if head_dim_is == "qk_head_dim" else None)):
            if value is not None and isinstance(getattr(config, key, None), int):
                set_field(config, key, value)
    for heads, size, expand in MAMBA_HEADS:  # SSM heads tile the expanded hidden size: keep them doing so
        values = [getattr(config, key, None) for key in (heads, size, expand, "hidden_size")]
        if all(isinstance(v, int) for v in values):
            inner = getattr(config, "mamba_d_ssm", None) or values[2] * values[3]
            if values[0] * values[1] != inner:
                setattr(config, size, SMALL["head_dim"])
                setattr(config, heads, inner // SMALL["head_dim"])
    fill_unset(config)
    # HRM's recurrent stacks: its num_hidden_layers counts every pass (cache slots), the stack size
    # times H_cycles times (L_cycles + 1); the stacks are shrunk, and that count follows them
    cycles = [getattr(config, key, None) for key in ("num_layers_per_stack", "H_cycles", "L_cycles")]
    if all(isinstance(value, int) for value in cycles):
        config.num_layers_per_stack = SMALL["num_hidden_layers"]
        config.num_hidden_layers = SMALL["num_hidden_layers"] * cycles[1] * (cycles[2] + 1)
    if per_layer:
        config.per_layer_config = {new: small_settings(per_layer[old]) for new, old in enumerate(kept) if old in per_layer}
    if isinstance(getattr(config, "activation_sparsity_pattern", None), list):
        config.activation_sparsity_pattern = [0.0] * len(config.activation_sparsity_pattern)  # erfinv: no ONNX op
    from transformers import PretrainedConfig

    for name in dict.fromkeys(["text_config", *(getattr(config, "sub_configs", None) or {})] if sub_configs
                              else ["text_config"]):
        if isinstance(getattr(config, name, None), PretrainedConfig):
            shrink(getattr(config, name), mixed_layers, sub_configs)


def fill_unset(config) -> None:
    """Fields a config declares but leaves None where its model reads a number, given the value
    their documented default means: head_dim None is the hidden size over the heads (Ministral,
    Hunyuan, whose models read it unchecked), num_key_value_heads None one per query head
    (Nemotron), and num_experts_per_tok None, beside a number of experts, SMALL's (DeepSeek V2,
    whose router calls topk with it). Where every expert count is None in a config that says
    which layers are experts (first_k_dense_replace: dots.llm1, whose default config places
    experts it does not count), the counts are SMALL's. vocab_size None is SMALL's vocabulary
    (ESM's default config has none: its tokenizer's list sets it), and ESM's padding token its
    tokenizer's. layer_types None in an LFM2 config (its convolution layers: `conv_L_cache`) is
    every layer full attention, as LFM2's config fills it from full_attn_idxs when none are given
    (LFM2-MoE's leaves it None, and its model reads it unchecked). A None that means "none" (Gemma 4's num_experts: no mixture of
    experts) is not one of these, and stays."""
    fields = vars(config)
    if "vocab_size" in fields and fields["vocab_size"] is None:
        set_field(config, "vocab_size", SMALL["vocab_size"])
    if getattr(config, "model_type", None) == "esm" and fields.get("pad_token_id", 0) is None:
        # ESM numbers positions past its padding token, as RoBERTa does, and its default config
        # names none: its tokenizer's <pad> is token 1
        set_field(config, "pad_token_id", 1)
    if fields.get("layer_types", 0) is None and "conv_L_cache" in fields and isinstance(fields.get("num_hidden_layers"), int):
        set_field(config, "layer_types", ["full_attention"] * fields["num_hidden_layers"])
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if "head_dim" in fields and fields["head_dim"] is None and isinstance(heads, int) and isinstance(hidden, int):
        set_field(config, "head_dim", hidden // heads)
    if "num_key_value_heads" in fields and fields["num_key_value_heads"] is None and isinstance(heads, int):
        set_field(config, "num_key_value_heads", heads)
    experts = any(isinstance(fields.get(key), int) for key in ("n_routed_experts", "num_experts", "num_local_experts"))
    if "num_experts_per_tok" in fields and fields["num_experts_per_tok"] is None and experts:
        set_field(config, "num_experts_per_tok", SMALL["num_experts_per_tok"])
    if (fields.get("n_routed_experts", 0) is None and fields.get("num_experts_per_tok", 0) is None
            and "first_k_dense_replace" in fields):
        for key in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts"):
            if fields.get(key, 0) is None:
                set_field(config, key, SMALL[key])


def set_field(config, key: str, value) -> None:
    """`config.key = value`, unless `key` is a property derived from other fields (Falcon's
    head_dim; ProphetNet's num_hidden_layers, the sum of its encoder's and decoder's; XLNet's
    max_position_embeddings, which it has none of), which then follows them as they are shrunk.
    Such a property's setter raises AttributeError or NotImplementedError."""
    try:
        setattr(config, key, value)
    except (AttributeError, NotImplementedError):
        pass


def small_settings(settings: dict) -> dict:
    """One layer's own settings shrunk as SMALL says; a layer with a key and value head per query
    head (dots3's MLA layers) keeps them so."""
    small = {key: SMALL.get(key, value) if isinstance(value, int) else value for key, value in settings.items()}
    if settings.get("num_key_value_heads", 0) == settings.get("num_attention_heads"):
        small["num_key_value_heads"] = small["num_attention_heads"]
    return small


def layer_count(config) -> int | None:
    """How many layers `config` has, by the first of the names families give it."""
    return next((getattr(config, k) for k in ("num_hidden_layers", "num_layers", "n_layer")
                 if isinstance(getattr(config, k, None), int)), None)


def kept_layers(config, layers: int | None) -> list[int]:
    """The two layers `shrink` keeps: the first, and the first of another `layer_types` entry if
    there is one, else the second."""
    types = getattr(config, "layer_types", None)
    if not (layers and isinstance(types, (list, tuple)) and len(types) == layers):
        return [0, 1]
    return [0, next((i for i, kind in enumerate(types) if kind != types[0]), 1)]


def fit_multimodal_rope(model) -> None:
    """Multimodal rotary embeddings (Qwen2-VL, GLM-4V) split their frequencies into sections for
    time, height and width, given in the modeling code for the full-size heads: each rotary module's
    sections are scaled, in proportion, to the frequencies its smaller heads have."""
    for module in model.modules():
        sections, frequencies = getattr(module, "mrope_section", None), getattr(module, "inv_freq", None)
        if not (isinstance(sections, list) and sections and all(isinstance(n, int) for n in sections)
                and frequencies is not None and sum(sections) != frequencies.numel()):
            continue
        shares = [n * frequencies.numel() / sum(sections) for n in sections]
        fitted = [int(share) for share in shares]
        for i in sorted(range(len(shares)), key=lambda i: fitted[i] - shares[i])[:frequencies.numel() - sum(fitted)]:
            fitted[i] += 1  # the largest remainders take what rounding down left
        module.mrope_section = fitted


def example_inputs(model, config) -> list[tuple[dict, str, dict, dict]] | str:
    """Candidate inputs for `model`'s forward, each (inputs by name, validation shapes, dynamic axes
    by name, arguments fixed in the export), the first whose forward runs to be used; or why none
    could be made. A spectrogram's layout differs between models (Whisper: mel bins, then frames;
    Speech2Text: frames, then features), so both are offered."""
    import inspect

    import torch

    parameters = inspect.signature(model.forward).parameters
    vocabulary = min(int(getattr(config, "vocab_size", None) or 256), 256)
    dtype = next(model.parameters()).dtype
    tokens = {"decoder_input_ids": torch.randint(0, vocabulary, (2, 16))} if (
        getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters) else {}
    sequence, batch = {0: "batch", 1: "sequence"}, {0: "batch"}
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 224)
    height_width = (size, size) if isinstance(size, int) else tuple(size) if len(size or ()) == 2 else (224, 224)
    image = (2, getattr(vision, "num_channels", 3), *height_width)
    grid = next((name for name in GRID_NAMES if name in parameters), None)
    if grid and "input_ids" not in parameters:
        return patch_inputs(vision, parameters, grid, dtype)
    if "input_ids" in parameters:
        inputs = {"input_ids": torch.randint(0, vocabulary, (2, 16)), **tokens}
        text = [(inputs, TEXT_SHAPES, {name: sequence for name in inputs}, {})]
        if "pixel_values" not in parameters:
            return text
        # a text and image dual encoder (CLIP, SigLIP; SigLIP2 its image as patches) wants both
        if "spatial_shapes" in parameters:
            return text + naflex_inputs(vision, parameters, vocabulary, dtype)
        return text + [({**inputs, "pixel_values": torch.rand(image, dtype=dtype)}, TEXT_SHAPES,
                        {**text[0][2], "pixel_values": batch}, {})]
    if "spatial_shapes" in parameters or "pixel_position_ids" in parameters:
        return naflex_inputs(vision, parameters, vocabulary, dtype)
    if "pixel_values" in parameters:  # a video model (VideoMAE, ViViT) takes frames as a second axis
        video = (image[0], getattr(vision, "num_frames", 8), *image[1:])
        return [({"pixel_values": torch.rand(shape, dtype=dtype)}, VISION_SHAPES, {"pixel_values": batch}, {})
                for shape in (image, video)]
    if "input_values" in parameters:  # a waveform, with or without a channel axis
        return [({"input_values": torch.randn(shape, dtype=dtype), **tokens}, WAVE_SHAPES,
                 {"input_values": {0: "batch", len(shape) - 1: "samples"}, **{n: sequence for n in tokens}}, {})
                for shape in ((2, SAMPLES), (2, 1, SAMPLES))]
    if "input_features" in parameters:
        fields = ("feature_projection_input_dim", "num_mel_bins", "feature_size", "input_feat_per_channel")
        bins = next((v for v in (getattr(config, f, None) for f in fields) if isinstance(v, int)), 80)
        return [({"input_features": torch.randn(shape, dtype=dtype), **tokens}, SPECTROGRAM_SHAPES,
                 {"input_features": {0: "batch", axis: "frames"}, **{n: sequence for n in tokens}}, {})
                for shape, axis in (((2, bins, FRAMES), 2), ((2, FRAMES, bins), 1))]
    if "past_values" in parameters:
        return series_inputs(parameters, config, dtype)
    required = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in ("self", "kwargs")]
    return ("takes none of input_ids, pixel_values, input_values, input_features, past_values "
            f"(needs {', '.join(required) or 'other inputs'})")


def series_inputs(parameters, config, dtype) -> list[tuple[dict, str, dict, dict]]:
    """A time series' context window (PatchTST's whole context_length, at most TIME_STEPS of
    TimesFM's 16384), with a channel axis or without; its padding mask (none padded) and frequency
    class (0) where the forward requires them (TimesFM)."""
    import inspect

    import torch

    length = min(int(getattr(config, "context_length", None) or TIME_STEPS), TIME_STEPS)
    channels = int(getattr(config, "num_input_channels", None) or 1)
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    candidates = []
    for shape in ((2, length, channels), (2, length)):
        inputs = {"past_values": torch.randn(shape, dtype=dtype)}
        if "past_values_padding" in required:
            inputs["past_values_padding"] = torch.zeros(shape[:2], dtype=torch.long)
        if "freq" in required:
            inputs["freq"] = torch.zeros((2, 1), dtype=torch.long)
        candidates.append((inputs, VISION_SHAPES, {name: {0: "batch"} for name in inputs}, {}))
    return candidates


def patch_inputs(vision, parameters, grid: str, dtype) -> list[tuple[dict, str, dict, dict]]:
    """Candidates for a vision tower fed the patches of an image and the grid they tile (Qwen2-VL,
    GLM-4V, Kimi K2.5): GRID's patches, flattened (channels x frames x patch x patch each), as
    small images for a convolution, or with a time axis, with the grid (and a spatial merge size
    where asked) fixed in the export. Nothing is dynamic: the tower computes positions from the
    grid's values."""
    import torch

    channels = next((v for v in (getattr(vision, k, None) for k in ("in_channels", "num_channels"))
                     if isinstance(v, int)), 3)
    frames = getattr(vision, "temporal_patch_size", None) or 1
    size = getattr(vision, "patch_size", None)
    size = size if isinstance(size, int) else 14
    count = GRID[0] * GRID[1] * GRID[2]
    layouts = [(count, channels * frames * size * size), (count, channels, size, size)]
    # with a time axis; or, where the config gives no temporal patch, flat with Qwen's 2 (MuseSpark)
    layouts += [(count, channels, frames, size, size)] if frames > 1 else [(count, channels * 2 * size * size)]
    name = next(n for n, p in parameters.items() if n != grid and n != "self")
    fixed = {grid: torch.tensor([GRID])}
    if "merge_sizes" in parameters:  # VideoLLaMA 3: each image's merge
        fixed["merge_sizes"] = torch.tensor([getattr(vision, "spatial_merge_size", None) or 2])
    return [({name: torch.randn(shape, dtype=dtype)}, f"1x{count}", {name: {}}, fixed) for shape in layouts]


def naflex_inputs(vision, parameters, vocabulary: int, dtype) -> list[tuple[dict, str, dict, dict]]:
    """A model fed an image as a sequence of flattened patches of its own aspect ratio: the patches
    of one image of GRID's rows and columns (channels x patch x patch each; each side rounded up to
    a multiple of a pooling kernel, which pools whole squares of them), and ids beside them for a
    dual encoder, with what places the patches fixed in the export: SigLIP2's NaFlex grid
    (`spatial_shapes`) and mask (none padded), or Gemma 4's (x, y) of each patch
    (`pixel_position_ids`). Nothing is dynamic: the model computes positions from their values."""
    import torch

    channels = getattr(vision, "num_channels", None) or 3
    size, pool = getattr(vision, "patch_size", None) or 16, getattr(vision, "pooling_kernel_size", None) or 1
    rows, columns = (-(-side // pool) * pool for side in GRID[1:])
    count = rows * columns
    inputs = {"input_ids": torch.randint(0, vocabulary, (1, 16))} if "input_ids" in parameters else {}
    inputs["pixel_values"] = torch.randn(1, count, channels * size * size, dtype=dtype)
    if "spatial_shapes" in parameters:
        fixed = {"spatial_shapes": torch.tensor([[rows, columns]]),
                 "pixel_attention_mask": torch.ones(1, count, dtype=torch.long)}
    else:
        x, y = torch.meshgrid(torch.arange(columns), torch.arange(rows), indexing="xy")
        fixed = {"pixel_position_ids": torch.stack([x, y], dim=-1).reshape(1, count, 2)}
    return [(inputs, f"1x{count}", {name: {} for name in inputs}, fixed)]


def first_output(model, names: list[str], fixed: dict | None = None):
    """`model` as a module of positional inputs named `names`, and the `fixed` arguments, returning
    its first output (no cache)."""
    import inspect

    import torch

    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    class FirstOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *values):
            out = self.model(**dict(zip(names, values)), **(fixed or {}), **no_cache)
            return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]

    return FirstOutput().eval()


# norms over channels or groups (convolutional models), never over the last axis alone, and the
# weight reparametrisations torch calls as modules: not counted
OTHER_NORMS = ("BatchNorm", "GroupNorm", "InstanceNorm", "NoNorm",  # MobileBERT's NoNorm is x * w + b
               "WeightNorm", "SpectralNorm")


def is_norm_module(module) -> bool:
    """A LayerNorm or RMSNorm kind of module: a class named "...Norm..." with no modules inside (a
    block named after its model, as RoBERTa-PreLayerNorm's are, holds some), and none of
    OTHER_NORMS (wav2vec2's convolution calls its weight's `_WeightNorm` on every forward)."""
    import torch

    name = type(module).__name__
    return ("Norm" in name and not any(other in name for other in OTHER_NORMS) and not any(True for _ in module.children())
            and not isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                                        torch.nn.modules.instancenorm._InstanceNorm)))


def count_norm_calls(model, run, gradients: bool = True) -> tuple[dict[str, int], int | None]:
    """Calls of each norm module's class (`is_norm_module`) during `run()`, and, run with
    `gradients`, how many distinct norms its result depends on (`norms_in_output`; else None)."""
    import torch

    calls: dict[str, int] = {}
    seen: list[tuple] = []  # (module, input, output) of every call

    def count(module, inputs, output):
        calls[type(module).__name__] = calls.get(type(module).__name__, 0) + 1
        seen.append((module, inputs[0] if inputs else None, output))

    hooks = [m.register_forward_hook(count) for m in model.modules() if is_norm_module(m)]
    try:
        with torch.set_grad_enabled(gradients):
            result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls, norms_in_output(result, seen) if gradients else None


def same_norm(call, other) -> bool:
    """Two (module, input, output) calls computing one norm of one tensor: the same input, the same
    kind of module, equal parameters and epsilon. An exporter merges them into one node (GPT-NeoX's
    parallel LayerNorms of one input have equal weights at random init)."""
    import torch

    (module, x, _), (other_module, other_x, _) = call, other
    if x is None or x is not other_x or type(module) is not type(other_module):
        return False
    params, other_params = dict(module.named_parameters()), dict(other_module.named_parameters())
    eps = [getattr(m, "eps", getattr(m, "variance_epsilon", None)) for m in (module, other_module)]
    return (params.keys() == other_params.keys() and eps[0] == eps[1]
            and all(torch.equal(params[k], other_params[k]) for k in params))


def norms_in_output(result, seen: list[tuple]) -> int | None:
    """How many distinct norms (`same_norm` calls counted once) `result` depends on, told by
    autograd: a call whose output no gradient reaches was left behind (a pooler's norm, one on
    tokens the last layer drops), and the exporter drops it too. An output autograd does not
    track is counted as reached; None where the result (a tensor, or a tuple of them) has no
    gradient to follow."""
    import torch

    results = [t for t in (result if isinstance(result, (tuple, list)) else [result])  # MGP-STR returns three
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not results:
        return None
    tracked = [i for i, (_, _, out) in enumerate(seen) if isinstance(out, torch.Tensor) and out.requires_grad]
    try:
        grads = torch.autograd.grad(sum(t.float().sum() for t in results), [seen[i][2] for i in tracked],
                                    allow_unused=True) if tracked else ()
    except RuntimeError:  # an op with no backward for this dtype on the CPU
        return None
    reached = [True] * len(seen)
    for i, grad in zip(tracked, grads):
        reached[i] = grad is not None
    distinct: list[list[int]] = []  # the calls of each distinct norm
    for i, call in enumerate(seen):
        group = next((g for g in distinct if same_norm(seen[g[0]], call)), None)
        if group is None:
            distinct.append([i])
        else:
            group.append(i)
    return sum(any(reached[i] for i in group) for group in distinct)


class NoInputsRan(Exception):
    """No candidate input ran the forward; the message gives each candidate's error."""


def first_forward(model, candidates: list) -> tuple[dict, str, dict, dict, dict, int | None]:
    """The first of `example_inputs`' candidates whose forward runs: (inputs, validation shapes,
    dynamic axes, fixed arguments, norm calls by class, distinct norms in the output). A forward
    that fails with gradients on (an in-place update of a tensor that needs one) is run again
    without, and the norms in the output are then not known. If none runs: a single candidate's
    error, or NoInputsRan naming each candidate's inputs and error, since which one tells the
    cause differs (Qwen2-VL: the first, ids; Speech2Text: the second spectrogram layout)."""
    errors: list[tuple[dict, Exception]] = []
    for inputs, shapes, axes, fixed in candidates:
        run = functools.partial(first_output(model, list(inputs), fixed), *inputs.values())
        for gradients in (True, False):
            try:
                return (inputs, shapes, axes, fixed, *count_norm_calls(model, run, gradients))
            except Exception as exc:
                error = exc
        errors.append((inputs, error))
    if len(errors) == 1:
        raise errors[0][1]
    raise NoInputsRan("; ".join(f"{describe(inputs)}: {type(error).__name__}: {reason(str(error))[:120]}"
                                for inputs, error in errors))


def describe(inputs: dict) -> str:
    """Inputs by name and shape: "input_ids 2x16 + pixel_values 2x3x224x224"."""
    return " + ".join(f"{name} {'x'.join(map(str, value.shape))}" for name, value in inputs.items())


# in the order tried; "unoptimised": without the dynamo exporter's ONNX optimiser (onnxscript's),
# which has written graphs that do not load (a Min's output dropped, Gemma 4's audio tower)
EXPORT_MODES = ("dynamic", "dynamic unoptimised", "static", "TorchScript")


def export(wrapped, inputs: dict, axes: dict, path: Path, after: str | None = None, failed: dict | None = None) -> str:
    """Export `wrapped` (`first_output`) with torch's dynamo exporter and the dynamic `axes` of each
    input (batch and sequence), or static shapes where it cannot; where it cannot export at all (a
    branch on data, such as the positions a vision tower computes from its patch grid), with the
    TorchScript exporter, which traces the values of this one run. Says which of EXPORT_MODES
    ("TorchScript" is static too). `after`: a mode whose export did not load or run, to try only
    the ones after it. `failed` gets, by mode, why each one tried before did not export."""
    import torch

    modes = EXPORT_MODES[EXPORT_MODES.index(after) + 1:] if after else EXPORT_MODES
    failed = {} if failed is None else failed
    args = tuple(inputs.values())
    names = {"input_names": list(inputs), "output_names": ["output"], "verbose": False}
    dynamo = {"dynamo": True, "custom_translation_table": translations(), **names}
    dynamic = (tuple(axes[name] for name in inputs),)  # one entry for the wrapper's *values: a spec per input
    dynamo_error: Exception | None = None
    with torch.no_grad(), complex_translations():
        for mode in ("dynamic", "dynamic unoptimised"):
            if mode in modes and any(axes.values()):
                try:
                    torch.onnx.export(wrapped, args, str(path), dynamic_shapes=dynamic, optimize=mode == "dynamic",
                                      **dynamo)
                    return mode
                except Exception as error:
                    failed[mode] = f"export: {type(error).__name__}: {reason(str(error))[:200]}"
        if "static" in modes:
            try:
                torch.onnx.export(wrapped, args, str(path), **dynamo)
                return "static"
            except Exception as error:
                dynamo_error = error
                failed["static"] = f"export: {type(error).__name__}: {reason(str(error))[:200]}"
        try:
            if half_precision(wrapped) and hasattr(wrapped.model, "set_attn_implementation"):
                # TorchScript's scaled_dot_product_attention writes a boolean mask's additive
                # form in float32, and type promotion then runs the attention after it in
                # float32 too: LayerNormalizations with float32 and half operands, which ONNX
                # Runtime refuses to load (BART in fp16). Eager attention is the same sums.
                wrapped.model.set_attn_implementation("eager")
            torch_script_export(wrapped, args, path, names)
        except Exception:
            if dynamo_error is None:
                raise
            raise dynamo_error from None  # the dynamo exporter's reason is the one to read
        return "TorchScript"


def half_precision(module) -> bool:
    """Whether `module`'s floating-point weights are float16 or bfloat16."""
    import torch

    return any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters())


def translations() -> dict:
    """ONNX for the aten ops torch's dynamo exporter has no translation of. `aten._is_all_true` is
    what `torch._check_tensor_all` (transformers' `torch_compilable_check`, e.g. D-FINE's check that
    its spatial shapes add up to the sequence) leaves in the graph: a check, whose result nothing
    computes with, so the export keeps no node of it."""
    import onnx
    import torch
    from onnxscript import opset18 as op

    def is_all_true(condition):
        return op.Cast(op.ReduceMin(op.Cast(condition, to=onnx.TensorProto.INT64), keepdims=0),
                       to=onnx.TensorProto.BOOL)

    return {torch.ops.aten._is_all_true.default: is_all_true}


@contextlib.contextmanager
def complex_translations():
    """Complex-valued translations torch's dynamo exporter lacks, for the time of an export.
    Llama 4's and DeepSeek V2's rotary embeddings multiply by `torch.polar` factors as complex
    numbers, and unsqueeze them on the way: the exporter translates the product and
    `view_as_real`, but not `aten.unsqueeze` of a complex tensor. Its complex tensors are real ones
    with a trailing axis of 2 (real, imaginary), so unsqueezing one is unsqueezing that real tensor
    at the same axis counted from the front, one further from the back. The public
    `custom_translation_table` registers every translation as real-valued, so this adds it to the
    registry the exporter builds, through a private hook (`_registration.ONNXRegistry.from_torchlib`);
    where a torch release no longer has it, the export goes on without (and fails as before)."""
    import torch
    from onnxscript import opset18 as op

    try:
        from torch.onnx._internal.exporter import _registration
        build = _registration.ONNXRegistry.from_torchlib.__func__
    except (ImportError, AttributeError):
        yield
        return

    def complex_unsqueeze(self, dim: int):
        return op.Unsqueeze(self, op.Constant(value_ints=[dim if dim >= 0 else dim - 1]))

    def with_complex(cls, *args, **kwargs):
        registry = build(cls, *args, **kwargs)
        try:
            registry.register_op(torch.ops.aten.unsqueeze.default, complex_unsqueeze, is_complex=True)
        except (TypeError, AttributeError):  # a torch whose registry takes it otherwise: the export goes on without
            pass
        return registry

    _registration.ONNXRegistry.from_torchlib = classmethod(with_complex)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = classmethod(build)


def torch_script_export(wrapped, args: tuple, path: Path, names: dict) -> None:
    """TorchScript's exporter. On a bfloat16 model, the Casts its scalar type analysis inserts
    (an attention scale cast to the query's type) are written with torch's own number for
    bfloat16, 15, which in ONNX is COMPLEX128: constant folding then stops on "ScalarType
    ComplexDouble is an unexpected tensor scalar type". So there it exports again unfolded and
    gives those Casts ONNX's number for bfloat16. TorchScript exports no complex tensor at all,
    so no Cast to COMPLEX128 it writes means one."""
    import onnx
    import torch

    try:
        torch.onnx.export(wrapped, args, str(path), dynamo=False, opset_version=TORCHSCRIPT_OPSET, **names)
    except RuntimeError as error:
        if "ComplexDouble" not in str(error):
            raise
        torch.onnx.export(wrapped, args, str(path), dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                          do_constant_folding=False, **names)
    model = onnx.load(str(path))
    misnumbered = [attribute for node in model.graph.node if node.op_type == "Cast"
                   for attribute in node.attribute if attribute.name == "to" and attribute.i == onnx.TensorProto.COMPLEX128]
    for attribute in misnumbered:
        attribute.i = onnx.TensorProto.BFLOAT16
    if misnumbered:
        onnx.save(model, str(path))


def small_model_run(model_type: str, dtype: str, record: dict, mixed_layers: bool, sub_configs: bool = True):
    """`model_type` shrunk (`shrink`), built with random weights and run once: the model and
    `first_forward`'s result. `record` gets the stage reached."""
    import torch
    from transformers import AutoConfig, AutoModel

    record["stage"] = "config"
    config = AutoConfig.for_model(model_type)
    shrink(config, mixed_layers, sub_configs)
    record["stage"] = "model"
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    base_models = MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(base_models, tuple) and not config.architectures:
        # several base models (Funnel's, with and without its decoder): the auto class picks the one
        # the config's architectures name, and on a default config, which names none, it fails
        # iterating None; the first is named, as a checkpoint of it would
        config.architectures = [base_models[0]]
    torch.manual_seed(0)
    # batched experts: each token's expert weights gathered, then batched matmuls. The default
    # grouped matmul has no ONNX translation, and the eager loop over the experts a token chose
    # is data-dependent, which torch.export cannot trace with dynamic shapes
    try:
        model = AutoModel.from_config(config, experts_implementation="batched_mm")
    except (TypeError, ValueError):
        model = AutoModel.from_config(config)
    model = model.to(getattr(torch, dtype)).eval()
    fit_multimodal_rope(model)
    record["stage"] = "forward"
    candidates = example_inputs(model, config)
    if isinstance(candidates, str):
        raise LookupError(candidates)
    return model, first_forward(model, candidates)


def sweep_one(model_type: str, dtype: str, work: Path) -> dict:
    """One model type through every stage; the record says how far it got and why it stopped."""
    record: dict = {"type": model_type, "dtype": dtype, "stage": "config"}
    started = time.perf_counter()
    try:
        failures: list[tuple[str, Exception]] = []  # (stage reached, error) of each settings tried
        for mixed_layers, sub_configs in shrink_attempts(model_type):
            try:
                model, (inputs, shapes, axes, fixed, calls, in_output) = small_model_run(
                    model_type, dtype, record, mixed_layers, sub_configs)
                break
            except Exception as exc:
                failures.append((record["stage"], exc))
        else:  # none ran: the row's reason is that of the settings that got furthest (max: the first of equals)
            record["stage"], error = max(failures, key=lambda failure: BUILD_STAGES.index(failure[0]))
            raise error from None
        if (mixed_layers, sub_configs) != (True, True):
            record["shrink"] = {"mixed_layers": mixed_layers, "sub_configs": sub_configs}
        record["inputs"] = {name: list(value.shape) for name, value in inputs.items()}
        if fixed:
            record["fixed"] = {name: value.tolist() for name, value in fixed.items()}
        record["norm_calls"], record["norm_modules"] = sum(calls.values()), calls
        record["norms_in_output"] = in_output
        exported = work / "model.onnx"
        wrapped = first_output(model, list(inputs), fixed)
        del model
        after = None
        while True:
            try:
                rewrite_and_validate(record, wrapped, inputs, axes, shapes, exported, work, after)
                break
            except Exception as exc:
                if record["stage"] != "validate" or record["export"] == EXPORT_MODES[-1] \
                        or not does_not_load_or_run(exc, exported):
                    raise
                # the export itself does not load or run (a size the trace took as fixed; a value
                # the dynamo exporter's optimiser dropped): exported again the next way
                after = record["export"]
                record.setdefault("export_failed", {})[after] = \
                    f"{type(exc).__name__}: {reason(str(exc).removeprefix(f'{exported}: '))[:200]}"
        record["stage"] = "done"
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {reason(str(exc))[:300]}"
        if os.environ.get("NORMFUSE_SWEEP_TRACE"):
            record["trace"] = traceback.format_exc()
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def does_not_load_or_run(exc: Exception, exported: Path) -> bool:
    """Whether validation stopped on the export itself not loading or running (ONNX Runtime or the
    evaluator), which another way of exporting may mend; not on the fused graph, and not on a
    model whose outputs are random (that is the model's, however it is exported)."""
    from export.errors import NormfuseError, RunFailure

    own = str(exc).startswith(f"{exported}:")
    return own and (isinstance(exc, RunFailure) or (isinstance(exc, NormfuseError) and "cannot load it" in str(exc)))


# what one attempt of rewrite_and_validate writes into the record, cleared before the next
ATTEMPT_FIELDS = ("export", "shapes", "fused", "fused_norms", "rejected", "refused_spellings", "unmatched_means", "nodes",
                  "on_evaluator", "validated", "max_abs", "judged_against_float32", "diagnosis",
                  "fused_op_tolerance_used", "fused_ops_against_float64")


def rewrite_and_validate(record: dict, wrapped, inputs: dict, axes: dict, shapes: str, exported: Path,
                         work: Path, after: str | None = None) -> None:
    """Export `wrapped` to `exported` (the modes `after` the one given), rewrite it in both forms
    and validate the fused graph against it, into `record` (each stage named there as it starts;
    what an earlier attempt wrote there is cleared first)."""
    import io

    for key in ATTEMPT_FIELDS:
        record.pop(key, None)
    record["stage"] = "export"
    failed = record.setdefault("export_failed", {})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mode = export(wrapped, inputs, axes, exported, after, failed)
    if not failed:
        del record["export_failed"]
    record["export"], record["shapes"] = mode, mode.split()[0]
    record["stage"] = "rewrite"
    from export.rewrite import rewrite_file

    # ONNX Runtime's CPU provider has no bfloat16 kernels: there the tensorrt form is validated, on
    # onnx's reference evaluator
    on_evaluator = record["dtype"] == "bfloat16"
    trt = rewrite_file(exported, work / "fused-tensorrt.onnx", target="tensorrt")
    ort = rewrite_file(exported, work / "fused.onnx", target="onnxruntime")
    record["fused"] = {"tensorrt": trt.counts, "onnxruntime": ort.counts}
    record["fused_norms"] = trt.fused
    record["rejected"] = [r.reason for r in trt.rejected if not r.no_norm]
    # spellings refused as no norm (epsilon outside the root: F.normalize, Zaya's query-key norm)
    record["refused_spellings"] = [r.reason for r in trt.rejected if r.no_norm]
    record["unmatched_means"] = len(trt.unmatched_means)
    record["nodes"] = [ort.nodes_before, ort.nodes_after]
    record["stage"] = "validate"
    from export.errors import MissingKernel
    from export.validate import Side, compare, model_dtype, parse_shapes, shape_label

    def validate(on_evaluator: bool) -> list[dict]:
        backend, form = ("onnx-reference", "fused-tensorrt.onnx") if on_evaluator else ("ort-cpu", "fused.onnx")
        return compare(Side(exported, backend, "reference"), Side(work / form, backend, "fused"),
                       parse_shapes(shapes if record["shapes"] == "dynamic" else shapes.split(",")[0]),
                       model_dtype(exported))

    try:
        pairs = validate(on_evaluator)
    except MissingKernel as exc:
        # ONNX Runtime's CPU provider lacks a kernel for one of the export's ops at its types
        # (JetMoE's ScatterND adding float16): the tensorrt form on the evaluator, as in bfloat16
        record["on_evaluator"] = exc.kernel[:200]
        pairs = validate(True)
    record["validated"] = all(p["passed"] for p in pairs)
    ops = pairs[0].get("op_check") or pairs[0].get("norm_check")  # each fused op alone, held to normops.OP
    if ops and ops["norms"]:
        record["fused_op_tolerance_used"] = round(max(
            s["tolerance_used"]["max"] for n in ops["norms"]
            for s in (*n["outputs"].values(), *n.get("at_epsilon_scale", {}).values())), 4)
        # against the reference's own nodes in float64, or (where they could not be run so) its values
        record["fused_ops_against_float64"] = sum(n.get("against") == "float64" for n in ops["norms"])
    # outputs whose reference lies within atol of 0 in every pair (a random model's activations that
    # die out): their pass says little
    faint = sorted(set.intersection(*({n for n, st in p["outputs"].items() if st.get("reference_within_atol")}
                                      for p in pairs)))
    if faint:
        record["outputs_within_atol_of_0"] = faint
    # against the export as it ran, also where a pair was judged again against it in float32
    record["max_abs"] = max(s["max_abs"] for p in pairs
                            for s in (p.get("against_half_reference") or p["outputs"]).values())
    judged = [shape_label(p) for p in pairs if p.get("against_half_reference")]
    if judged:
        record["judged_against_float32"] = judged
    checked = next((p for p in pairs if p.get("norm_check")), None)
    if checked:  # a failing pair: where its difference comes from (the fused ops, a choice by value, rounding)
        from export.norm_check import describe
        from export.validate import describe_float32

        line = describe(checked["norm_check"])
        if checked.get("float32_check"):
            line += f"; {describe_float32(checked)}"
        record["diagnosis"] = f"{shape_label(checked)}: {line}"


def shrink_attempts(model_type: str) -> list[tuple[bool, bool]]:
    """The (mixed_layers, sub_configs) settings of `shrink` to build and run `model_type` with, in
    turn until one runs: every config shrunk and a layer of each type first; then, where they make
    another config, only the text config (a model whose other parts assume their full size), the
    first two layers (Zamba's shared blocks want them), and both."""
    from transformers import AutoConfig

    attempts, seen = [], []
    for settings in ((True, True), (True, False), (False, True), (False, False)):
        try:
            config = AutoConfig.for_model(model_type)
            shrink(config, *settings)
            made = config.to_dict()
        except Exception as exc:  # tried again in small_model_run, where its stage is recorded
            made = repr(exc)
        if made not in seen:
            attempts.append(settings)
            seen.append(made)
    return attempts


def reason(message: str) -> str:
    """One line of an exception's message: torch.onnx's own message is many lines, with the
    cause under "## Exception summary"; otherwise the last line naming an error, or the last."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    summary = next((i for i, line in enumerate(lines) if line == "## Exception summary"), None)
    if summary is not None and summary + 1 < len(lines):
        return lines[summary + 1]
    return ([line for line in lines if "Error" in line] or lines or [""])[-1]


def verdict(record: dict) -> str:
    """ok, check (fewer fused than distinct norms in the output, or than norm calls where those are
    not known, and none refused; or fewer fused and refused, counting the spellings refused as no
    norm, than those), failed (validation), timeout, crashed, or the stage it stopped at; "ok
    against float32" where a pair passed only against the export run in float32."""
    if record["stage"] in ("timeout", "crashed"):
        return record["stage"]
    if record["stage"] != "done":
        return f"stopped at {record['stage']}"
    if not record["validated"]:
        return "failed"
    refused_spellings = record.get("refused_spellings", [])
    if refused_spellings:  # a norm module spelled as no norm (Zaya's) is explained by its refusal, one each
        if record["fused_norms"] + len(record["rejected"]) + len(refused_spellings) < expected_norms(record):
            return "check"
    elif record["fused_norms"] < expected_norms(record) and not record["rejected"]:
        return "check"
    return "ok against float32" if record.get("judged_against_float32") else "ok"


def expected_norms(record: dict) -> int:
    """The distinct norms in the output, or the norm calls where those are not known."""
    return record["norm_calls"] if record.get("norms_in_output") is None else record["norms_in_output"]


def run_one(model_type: str, dtype: str, timeout: float) -> dict:
    """`model_type` in a process of its own: its record, or one saying it timed out or crashed."""
    with tempfile.TemporaryDirectory(prefix=f"normfuse-sweep-{model_type}-") as work:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", model_type, "--dtype", dtype, "--work", work],
                                  capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"type": model_type, "dtype": dtype, "stage": "timeout", "error": f"past {timeout:.0f} s"}
    line = next((line for line in reversed(done.stdout.splitlines()) if line.startswith(RESULT_MARK)), None)
    if line is None:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"type": model_type, "dtype": dtype, "stage": "crashed", "error": tail[:300]}
    return json.loads(line[len(RESULT_MARK):])


def versions() -> dict:
    """export.build's environment, and what the sweep depends on besides."""
    from importlib.metadata import version

    from export.build import environment

    return {**environment(), "cpus": os.cpu_count(), "transformers": version("transformers"),
            "onnxscript": version("onnxscript")}


def calls_cell(record: dict) -> str:
    """Norm calls, and in brackets the distinct norms in the output where fewer ("16 (15)")."""
    return f"{record['norm_calls']}" + (f" ({expected_norms(record)})" if expected_norms(record) != record["norm_calls"]
                                        else "")


def markdown(records: list[dict], dtype: str, unswept: list[str]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[verdict(record)] = counts.get(verdict(record), 0) + 1
    done = [r for r in records if r["stage"] == "done"]
    lines = [f"# transformers model types, {dtype}: {len(records)} swept, {len(done)} exported and rewritten", ""]
    if unswept:
        lines += [f"**Unfinished: {len(unswept)} types to sweep** (`--update` sweeps them).", ""]
    if dtype == "bfloat16":
        lines += ["Validated: the tensorrt form against the export, both on onnx's reference evaluator "
                  "(ONNX Runtime's CPU provider has no bfloat16 kernels).", ""]
    lines += ["| verdict | types |", "| --- | --- |"]
    lines += [f"| {name} | {n} |" for name, n in sorted(counts.items())]
    lines += ["", f"{sum(r['norm_calls'] for r in done)} norm module calls, {sum(map(expected_norms, done))} distinct "
                  f"norms in the outputs; {sum(r['fused_norms'] for r in done)} norms fused (tensorrt target)", "",
              "| type | export | norm calls (distinct, in output) | fused (tensorrt) | fused (onnxruntime) | nodes | "
              "validation max abs | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in done:
        ort = ", ".join(f"{n} {k}" for k, n in sorted(r["fused"]["onnxruntime"].items())) or "none"
        lines.append(f"| {r['type']} | {r.get('export', r['shapes'])} | {calls_cell(r)} | {r['fused_norms']} | {ort} | "
                     f"{r['nodes'][0]} -> {r['nodes'][1]} | {r['max_abs']:.2g} | {verdict(r)} |")
    failed = [r for r in done if r.get("diagnosis") and not r["validated"]]
    if failed:
        lines += ["", "Failed validations, where the difference comes from (`export.validate`'s norm check):", ""]
        lines += [f"- {r['type']} at {r['diagnosis']}" for r in failed]
    evaluated = [r for r in done if r.get("on_evaluator")]
    if evaluated:
        lines += ["", "Validated in their tensorrt form on onnx's reference evaluator, ONNX Runtime's CPU provider "
                      "having no kernel for one of their ops:", ""]
        lines += [f"- {r['type']}: {r['on_evaluator']}" for r in evaluated]
    judged = [r for r in done if r.get("diagnosis") and r["validated"]]
    if judged:
        lines += ["", f"Validated against the export run in float32, the {dtype} export's own rounding being the "
                      "difference (`export.precision_check`):", ""]
        lines += [f"- {r['type']} at {r['diagnosis']}" for r in judged]
    return "\n".join(lines) + "\n"


def write_records(path: Path, header: dict, records: dict[str, dict], unswept: list[str]) -> None:
    """The records, after `header` (versions, dtype), as JSON at `path`, and their Markdown summary
    beside it, each replaced whole."""
    from export.files import write_json, write_text

    ordered = sorted(records.values(), key=lambda r: r["type"])
    write_json(path, {**header, "unswept": unswept, "records": ordered})
    write_text(path.with_suffix(".md"), markdown(ordered, header["dtype"], unswept))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--types", help="comma-separated model types (default: every base model type)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="types at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a type may take (default 300)")
    parser.add_argument("--json", help="write the records here, and a Markdown summary beside it (.md)")
    parser.add_argument("--update", action="store_true",
                        help="sweep again, into the --json file's records, the --types given, or else its unswept "
                             "types and every type there whose norm calls were counted; the other records stay")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: one type, its record on stdout
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        warnings.filterwarnings("ignore")
        print(RESULT_MARK + json.dumps(sweep_one(args.one, args.dtype, Path(args.work))), flush=True)
        return 0

    from rich.console import Console
    from rich.progress import Progress
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    known = sorted(MODEL_MAPPING_NAMES)
    previous: dict[str, dict] = {}
    left: list[str] = []
    if args.update:
        if not args.json or not Path(args.json).is_file():
            print(f"transformers_sweep: error: --update needs an existing --json file ({args.json} is none)", file=sys.stderr)
            return 2
        payload = json.loads(Path(args.json).read_text())
        previous, left = {r["type"]: r for r in payload["records"]}, payload.get("unswept", [])
    types = list(dict.fromkeys([t.strip() for t in args.types.split(",")] if args.types  # each once
                               else left + [t for t, r in previous.items() if "norm_calls" in r] if args.update
                               else known))
    unknown = [t for t in types if t not in known]
    if unknown:
        print(f"transformers_sweep: error: not a base model type of transformers: {', '.join(unknown)}", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    records = dict(previous)
    unswept = list(dict.fromkeys(left + types))
    header = {"versions": versions(), "dtype": args.dtype} if args.json else {}
    with Progress(console=console) as progress, ThreadPoolExecutor(args.jobs) as pool:
        task = progress.add_task(f"{len(types)} model types ({args.dtype})", total=len(types))
        for record in pool.map(lambda t: run_one(t, args.dtype, args.timeout), types):
            records[record["type"]] = record
            unswept.remove(record["type"])
            progress.advance(task)
            if args.json:  # as each type finishes, so a stopped sweep keeps what it did
                write_records(Path(args.json), header, records, unswept)
            if verdict(record) != "ok" and record["stage"] == "done":
                progress.console.print(f"{record['type']}: {verdict(record)} ({calls_cell(record)} norm calls, "
                                       f"{record['fused_norms']} fused)")
    summary = markdown(sorted(records.values(), key=lambda r: r["type"]), args.dtype, unswept)
    console.print(summary.split("\n\n| type")[0])
    return 1 if any(verdict(r) == "failed" for r in records.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
