"""Named model shapes: from test-sized to 7B-like."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class BlockConfig:
    norm: str  # "rmsnorm" (LLaMA-style block) or "layernorm" (GPT-style block)
    layers: int
    hidden: int
    heads: int
    ffn: int
    dtype: str = "float32"
    eps: float = 1e-5
    # LayerNorm written as F.layer_norm (native ONNX op) or spelled out (decomposed subgraph).
    decomposed_layernorm: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def as_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> "BlockConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# Per preset: layers, hidden, heads, and ffn for each family (GPT: 4h, LLaMA: ~8h/3 rounded).
_PRESETS = {
    "tiny": dict(layers=2, hidden=64, heads=4, ffn={"layernorm": 256, "rmsnorm": 176}),
    "small": dict(layers=4, hidden=512, heads=8, ffn={"layernorm": 2048, "rmsnorm": 1376}),
    "gpt2-xl": dict(layers=48, hidden=1600, heads=25, ffn={"layernorm": 6400, "rmsnorm": 4288}),
    "llama-7b": dict(layers=32, hidden=4096, heads=32, ffn={"layernorm": 16384, "rmsnorm": 11008}),
}
PRESET_NAMES = tuple(_PRESETS)


def describe_presets() -> str:
    """One line per preset for --help: `tiny: 2 layers, hidden 64, 4 heads`."""
    return "; ".join(f"{name}: {p['layers']} layers, hidden {p['hidden']}, {p['heads']} heads"
                     for name, p in _PRESETS.items())


def preset(name: str, norm: str, **overrides) -> BlockConfig:
    """The config of preset `name` for the block family of `norm`, with any non-None overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    if norm not in ("rmsnorm", "layernorm"):
        raise ValueError(f"unknown norm {norm!r}; choose rmsnorm or layernorm")
    p = _PRESETS[name]
    config = BlockConfig(norm=norm, layers=p["layers"], hidden=p["hidden"], heads=p["heads"], ffn=p["ffn"][norm])
    config = config.with_overrides(**overrides)
    if config.hidden % config.heads:
        raise ValueError(f"hidden size {config.hidden} is not divisible by {config.heads} heads")
    if norm == "rmsnorm" and config.hidden // config.heads % 2:
        raise ValueError(f"head size {config.hidden // config.heads} (hidden {config.hidden} over {config.heads} heads) "
                         "is odd: the rmsnorm stack's rotary embedding turns pairs of a head's dimensions")
    return config


def count_norms(config: BlockConfig) -> tuple[int, int]:
    """(norms, norms with a residual Add in front) in a stack of this config: without torch, so
    commands that only read a config (export.build --onnx) do not import it."""
    return 2 * config.layers + 1, 2 * config.layers
