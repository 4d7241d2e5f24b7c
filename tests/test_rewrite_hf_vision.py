"""Hugging Face vision and speech encoders as torch's exporter writes them: every LayerNorm over the
last axis is fused, what normalises another axis is left alone, and the fused graph matches the
exported one. Tiny random configs, nothing downloaded; each export takes seconds, so all are slow.

ConvNeXt's LayerNorms in `channels_first` form (its downsampling layers) permute to channels-last
and back around `F.layer_norm`, so they are last-axis norms and fuse; ConvNeXt-V2's Global Response
Normalization (a mean over channels of each channel's spatial L2 norm) is no LayerNorm or RMSNorm
and stays, named in the notes as a last-axis mean in no norm. SAM's neck normalises channels the
same way as ConvNeXt. Swin-V2 normalises the attention and MLP outputs after them (res-post-norm),
so only the stage's first norm has an Add in front; wav2vec2's feature extractor normalises each
conv layer's output over its channels, transposed to the last axis.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest

from export.rewrite import rewrite_file
from export.validate import Side, compare

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

IMAGE = (3, 32, 32)


def build(arch: str):
    """The model and the shape of one input (without the batch)."""
    t = transformers
    if arch == "dinov2":
        return t.Dinov2Model(t.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, image_size=32, patch_size=8)), IMAGE
    if arch == "beit":
        return t.BeitModel(t.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                         image_size=32, patch_size=8, use_mean_pooling=True)), IMAGE
    if arch == "convnext":
        return t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)), IMAGE
    if arch == "convnextv2":
        return t.ConvNextV2Model(t.ConvNextV2Config(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                    image_size=32)), IMAGE
    if arch == "swinv2":
        return t.Swinv2Model(t.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                            window_size=4)), IMAGE
    if arch == "segformer":
        return t.SegformerModel(t.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                  hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                                  strides=[4, 2], mlp_ratios=[2, 2])), IMAGE
    if arch == "sam-vision":
        return t.SamVisionModel(t.SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                                                  patch_size=16, output_channels=16, window_size=2, global_attn_indexes=[0],
                                                  mlp_dim=64)), (3, 64, 64)
    if arch == "wav2vec2":
        return t.Wav2Vec2Model(t.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, conv_dim=(16, 16), conv_stride=(5, 2),
                                                conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                                num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                                                do_stable_layer_norm=True)), (1600,)
    raise ValueError(arch)


# arch -> {target: fused norms by op}; the onnxruntime target leaves a native LayerNormalization
# without an Add in front as it is (one op already)
EXPECTED = {
    "dinov2": {"tensorrt": {"AddLayerNorm": 4, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 4}},
    "beit": {"tensorrt": {"AddLayerNorm": 3, "LayerNorm": 1}, "onnxruntime": {"AddLayerNorm": 3}},
    "convnext": {"tensorrt": {"LayerNorm": 4}, "onnxruntime": {}},
    "convnextv2": {"tensorrt": {"LayerNorm": 4}, "onnxruntime": {}},
    "swinv2": {"tensorrt": {"AddLayerNorm": 1, "LayerNorm": 6}, "onnxruntime": {"AddLayerNorm": 1}},
    "segformer": {"tensorrt": {"AddLayerNorm": 3, "LayerNorm": 6}, "onnxruntime": {"AddLayerNorm": 3}},
    "sam-vision": {"tensorrt": {"AddLayerNorm": 1, "LayerNorm": 3}, "onnxruntime": {"AddLayerNorm": 1}},
    "wav2vec2": {"tensorrt": {"AddLayerNorm": 5, "LayerNorm": 3}, "onnxruntime": {"AddLayerNorm": 5}},
}
# torch.export specialises the batch of SegFormer's reshapes to the example's: run at batch 1 only
BATCHES = {"segformer": (1,)}


class LastHiddenState(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


def export(arch: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model, shape = build(arch)
    with torch.no_grad():  # as in a trained model, no two norms share weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = directory / f"{arch}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHiddenState(model.eval()), (torch.randn(1, *shape),), str(path), dynamo=True,
                          opset_version=18, input_names=["x"], output_names=["last_hidden_state"],
                          dynamic_shapes={"x": {0: "batch"}})
    return path


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_vision_and_speech_encoders_are_fused_and_match(arch, tmp_path):
    source = export(arch, tmp_path)
    for target, expected in EXPECTED[arch].items():
        fused = tmp_path / f"{arch}-{target}.onnx"
        report = rewrite_file(source, fused, target=target)
        assert report.counts == expected, (target, [r.reason for r in report.rejected])
        assert not report.rejected
        unmatched = [n for n in report.notes if "in no norm found" in n]
        assert bool(unmatched) == (arch == "convnextv2"), unmatched  # its GRN means, and only those
        backend = "ort-cpu" if target == "onnxruntime" else "onnx-reference"
        shapes = [(batch, 16) for batch in BATCHES.get(arch, (1, 2))]
        for pair in compare(Side(source, backend, "reference"), Side(fused, backend, "fused"), shapes, "float32"):
            assert pair["passed"], (target, pair)
