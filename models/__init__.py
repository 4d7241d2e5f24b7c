"""Transformer blocks to export: GPT-style (LayerNorm) and LLaMA-style (RMSNorm)."""
from .presets import PRESET_NAMES, BlockConfig, count_norms, describe_presets, preset

__all__ = ["PRESET_NAMES", "BlockConfig", "describe_presets", "preset", "build_model", "count_norms", "TORCH_DTYPES"]


def __getattr__(name):  # torch is imported only when a model is built
    if name in ("build_model", "TORCH_DTYPES", "TransformerStack"):
        from . import blocks

        return getattr(blocks, name)
    raise AttributeError(name)
