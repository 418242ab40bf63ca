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
    """Multi-head attention over ``x[*, T, d]`` with an optional boolean mask ``[T, T]`` (True = keep).

    ``keep_from=s`` returns only rows ``s..T-1``: those rows are the queries, while keys and values
    still come from all ``T`` rows. A caller that throws the first ``s`` outputs away (the T-PSM
    aggregator keeps the newer half, the head keeps the chunk) then pays for ``T - s`` query rows
    instead of ``T``, and the out-projection runs on those rows only.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, keep_from: int = 0) -> torch.Tensor:
        """``x[*, T, d] -> [*, T - keep_from, d]``; ``mask`` is ``[T, T]`` (its rows ``keep_from:`` are used)."""
        *batch, t, d = x.shape
        if keep_from:
            rows = t - keep_from
            weight, bias = self.qkv.weight, self.qkv.bias  # [3d, d], [3d]: rows q | k | v
            q = F.linear(x[..., keep_from:, :], weight[:d], bias[:d])  # [*, T-s, d]
            q = q.view(*batch, rows, self.n_heads, self.d_head).transpose(-3, -2)  # [*, H, T-s, dh]
            kv = F.linear(x, weight[d:], bias[d:]).view(*batch, t, 2, self.n_heads, self.d_head)  # [*, T, 2, H, dh]
            k, v = kv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each [*, H, T, dh]
            if mask is not None:
                mask = mask[keep_from:]  # [T-s, T]
        else:
            rows = t
            qkv = self.qkv(x).view(*batch, t, 3, self.n_heads, self.d_head)  # [*, T, 3, H, dh]
            q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each [*, H, T, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [*, H, T-s, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        mixed = scores.softmax(dim=-1) @ v  # [*, H, T-s, dh]
        return self.out(mixed.transpose(-3, -2).reshape(*batch, rows, d))  # [*, T-s, d]


class MLP(nn.Module):
    """Position-wise feed-forward network ``d -> ratio*d -> d`` with GELU."""

    def __init__(self, d_model: int, ratio: int = 4) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, ratio * d_model)
        self.down = nn.Linear(ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``keep_from=s`` computes only output rows ``s..T-1`` (attention still reads all rows): the
    residual, the MLP and its norm then run on ``T - s`` rows. Only a network's last block may
    do this, since every row of an earlier block's output is a key for the next one.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, keep_from: int = 0) -> torch.Tensor:
        """``x[*, T, d] -> [*, T - keep_from, d]``."""
        x = x[..., keep_from:, :] + self.attn(self.norm_attn(x), mask, keep_from)  # [*, T-s, d]
        return x + self.mlp(self.norm_mlp(x))


class Transformer(nn.Module):
    """A stack of :class:`TransformerBlock` with a final LayerNorm.

    ``forward(x, mask, keep_from=s)`` equals ``forward(x, mask)[..., s:, :]`` up to rounding, but
    the last block computes only the kept rows (earlier blocks need all rows as keys and values),
    and the final norm runs on them alone. The result is a fresh tensor of ``T - s`` rows, not a
    view of a larger one.
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, keep_from: int = 0) -> torch.Tensor:
        """``x[*, T, d] -> [*, T - keep_from, d]``; ``mask`` is ``[T, T]`` (True = keep)."""
        if not 0 <= keep_from < x.shape[-2]:
            raise ValueError(f"keep_from={keep_from} must be in [0, {x.shape[-2]}) for {x.shape[-2]} rows")
        if not self.blocks:
            x = x[..., keep_from:, :]  # [*, T-s, d]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, keep_from if i == last else 0)  # [*, T, d]; [*, T-s, d] after the last
        return self.norm(x)
