"""Transformer blocks to export: GPT-style (LayerNorm) and LLaMA-style (RMSNorm)."""
from .presets import PRESET_NAMES, BlockConfig, preset

__all__ = ["PRESET_NAMES", "BlockConfig", "preset", "build_model", "count_norms", "TORCH_DTYPES"]


def __getattr__(name):  # torch is imported only when a model is built
    if name in ("build_model", "count_norms", "TORCH_DTYPES", "TransformerStack"):
        from . import blocks

        return getattr(blocks, name)
    raise AttributeError(name)
