"""Torch modules for the two norms, written the way Transformer code writes them.

Statistics are computed in fp32 for fp16/bf16 inputs, as the op contract requires. The modules
are what models/ uses, so the exported graphs show the subgraphs real exporters produce.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .contract import DEFAULT_EPSILON


class RMSNorm(nn.Module):
    """LLaMA-style RMSNorm: y = weight * (x / rms(x)).to(dtype), rms in fp32."""

    def __init__(self, hidden: int, eps: float = DEFAULT_EPSILON):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis.

    `decomposed=False` calls F.layer_norm (exporters emit ONNX LayerNormalization, whose
    stash_type=1 keeps statistics in fp32); `decomposed=True` writes the maths out with an
    explicit fp32 cast, as much hand-written model code does.
    """

    def __init__(self, hidden: int, eps: float = DEFAULT_EPSILON, decomposed: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps
        self.decomposed = decomposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.decomposed:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        dtype = x.dtype
        h = x.float()
        centred = h - h.mean(-1, keepdim=True)
        variance = centred.pow(2).mean(-1, keepdim=True)
        h = centred / torch.sqrt(variance + self.eps)
        return h.to(dtype) * self.weight + self.bias
