"""Small, readable transformer building blocks shared by components and baselines.

Attention is written as plain matmul + softmax: on this project's typical inputs (a handful of
state tokens per aggregator call, thousands of calls batched together) it was measured faster on
CPU than ``scaled_dot_product_attention``, whose per-call overhead dominates at 2-16 tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class MultiHeadAttention(nn.Module):
    """Multi-head attention over ``x[*, T, d]`` with an optional boolean mask ``[T, T]`` (True = keep)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        *batch, t, d = x.shape
        qkv = self.qkv(x).view(*batch, t, 3, self.n_heads, self.d_head)  # [*, T, 3, H, dh]
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each [*, H, T, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [*, H, T, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        mixed = scores.softmax(dim=-1) @ v  # [*, H, T, dh]
        return self.out(mixed.transpose(-3, -2).reshape(*batch, t, d))


class MLP(nn.Module):
    """Position-wise feed-forward network ``d -> ratio*d -> d`` with GELU."""

    def __init__(self, d_model: int, ratio: int = 4) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, ratio * d_model)
        self.down = nn.Linear(ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), mask)
        return x + self.mlp(self.norm_mlp(x))


class Transformer(nn.Module):
    """A stack of :class:`TransformerBlock` with a final LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)
