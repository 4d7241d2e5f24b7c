"""Small, readable Transformer blocks.

GPT-style: pre-LN, LayerNorm, multi-head causal attention, GELU MLP.
LLaMA-style: pre-norm, RMSNorm, rotary position embedding, SwiGLU MLP.
A stack takes hidden states (batch, seq, hidden) and returns them after a final norm, so each
layer holds two norms with a residual Add in front of all but the very first one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from normops.torch_modules import LayerNorm, RMSNorm

from .presets import BlockConfig


class Attention(nn.Module):
    def __init__(self, config: BlockConfig, rotary: bool):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden, bias=not rotary)
        self.out = nn.Linear(config.hidden, config.hidden, bias=not rotary)
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, self.head_dim).transpose(1, 3).unbind(2)
        if self.rotary:
            q, k = apply_rotary(q, k, seq)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, hidden))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, seq: int, base: float = 10000.0):
    """Rotary position embedding (rotate-half form) computed from the sequence length."""
    head_dim = q.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=q.device) / head_dim)
    angles = torch.arange(seq, dtype=torch.float32, device=q.device)[:, None] * inv_freq[None, :]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(q.dtype)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).to(q.dtype)

    def rotate(t):
        first, second = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-second, first), dim=-1) * sin

    return rotate(q), rotate(k)


class GeluMLP(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden, config.ffn)
        self.down = nn.Linear(config.ffn, config.hidden)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """One pre-norm Transformer layer: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        llama = config.norm == "rmsnorm"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, rotary=llama)
        self.mlp_norm = make_norm(config)
        self.mlp = SwiGLU(config) if llama else GeluMLP(config)

    def forward(self, x):
        h = x + self.attn(self.attn_norm(x))
        return h + self.mlp(self.mlp_norm(h))


def make_norm(config: BlockConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden, config.eps)
    return LayerNorm(config.hidden, config.eps, decomposed=config.decomposed_layernorm)


class TransformerStack(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final_norm = make_norm(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.final_norm(hidden_states)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(config: BlockConfig, seed: int = 0) -> TransformerStack:
    """A stack with seeded random weights; norm weights are perturbed so gamma/beta matter."""
    if config.dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose from {', '.join(TORCH_DTYPES)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TransformerStack(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("norm.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.to(TORCH_DTYPES[config.dtype]).eval()
