"""Attention baselines in the PSM harness: ``gpt`` (full causal attention) and ``swa`` (sliding window).

Both use rotary position embeddings (RoPE) and no learned absolute positions, so a model trained on
length L runs on 16 L. Attention is plain matmul + softmax (see :mod:`psmsearch.layers`: faster than
SDPA on CPU at these sizes). Streaming keeps a KV cache: for ``gpt`` one that grows with the sequence
(allocated in blocks of 256 slots to amortise copies), for ``swa`` a ring buffer of ``window`` entries.
Streaming and parallel evaluation compute the same function (the tests check it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from psmsearch import states as S
from psmsearch.config import ModelConfig
from psmsearch.errors import ConfigError
from psmsearch.layers import MLP

ROPE_BASE = 10000.0


def rope_angles(positions: torch.Tensor, d_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions[T]`` -> ``(cos, sin)`` each ``[T, d_head/2]``, computed the same way in both modes."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, d_head, 2, dtype=torch.float32, device=positions.device) / d_head)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, dh/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x[*, T, dh]`` by the angles of each position."""
    even, odd = x[..., 0::2], x[..., 1::2]  # [*, T, dh/2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE; ``window=None`` is full attention."""

    def __init__(self, d_model: int, n_heads: int, window: int | None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.window = window
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x[B, T, d]`` at ``positions[T]`` -> rotated ``q, k`` and ``v``, each ``[B, H, T, dh]``."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)  # [B, H, T, dh] x3
        cos, sin = rope_angles(positions, self.d_head)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        """``q[B, H, Tq, dh]`` over ``k, v[B, H, Tk, dh]``; key ``j`` visible to query ``i`` iff causal and in window."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [B, H, Tq, Tk]
        visible = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
        if self.window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - self.window
        mixed = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # [B, H, Tq, dh]
        b, h, t, dh = mixed.shape
        return self.out(mixed.transpose(1, 2).reshape(b, t, h * dh))  # [B, Tq, d] (no -1: Tq may be 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        q, k, v = self.project(x, positions)
        return self.attend(q, k, v, positions, positions)


class AttentionBlock(nn.Module):
    """Pre-norm residual block: causal attention then MLP."""

    def __init__(self, config: ModelConfig, window: int | None) -> None:
        super().__init__()
        d = config.d_model
        self.norm_attn = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, config.n_heads, window)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, config.mlp_ratio)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x)))  # [B, T, d]
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class AttentionLanguageModel(nn.Module):
    """``embedding -> L x AttentionBlock -> norm -> head``; ``window=None`` is GPT, else SWA."""

    uses_every_parameter = True
    """Every parameter takes part in every training step (no flow control), so data parallelism
    need not search for unused ones (see :func:`psmsearch.distributed.wrap_model`)."""

    def __init__(self, config: ModelConfig, vocab_size: int, window: int | None) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.window = window
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.blocks = nn.ModuleList(AttentionBlock(config, window) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))  # [B, T, V]

    def stream(self, batch_size: int) -> "AttentionStream":
        return AttentionStream(self, batch_size)


class KVCache:
    """Keys and values of one layer: ``[B, H, capacity, dh]`` buffers plus each slot's position.

    ``window=None``: a growing cache allocated in blocks of :attr:`BLOCK` slots (at most ``BLOCK - 1``
    unused slots; the reallocation copy costs O(n / BLOCK) per token, far below attention's O(n)).
    Otherwise a ring of exactly ``window`` slots; slot ``p % window`` holds position ``p``.
    """

    BLOCK = 256

    def __init__(self, batch_size: int, n_heads: int, d_head: int, window: int | None, like: torch.Tensor) -> None:
        self.window = window
        capacity = window if window is not None else 0
        self.k = like.new_zeros(batch_size, n_heads, capacity, d_head)
        self.v = like.new_zeros(batch_size, n_heads, capacity, d_head)
        self.pos = torch.full((capacity,), -1, dtype=torch.int64, device=like.device)  # -1: empty slot
        self.length = 0  # tokens seen

    def _grow(self, needed: int) -> None:
        if needed <= self.k.shape[2]:
            return
        capacity = math.ceil(needed / self.BLOCK) * self.BLOCK
        b, h, old, dh = self.k.shape
        for name in ("k", "v"):
            buffer = getattr(self, name).new_zeros(b, h, capacity, dh)
            buffer[:, :, :old] = getattr(self, name)
            setattr(self, name, buffer)
        pos = torch.full((capacity,), -1, dtype=torch.int64, device=self.pos.device)
        pos[:old] = self.pos
        self.pos = pos

    def attend_context(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new ``k, v[B, H, m, dh]`` and return the keys/values/positions they may see.

        A growing cache appends first and returns views of its filled prefix (no copy). A ring
        returns its filled slots followed by the new tokens, then stores the last ``window`` of them.
        """
        if self.window is None:
            self.append(k, v, positions)
            n = self.length
            return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]  # [B, H, n, dh] views
        filled = self.pos >= 0  # [W]
        context = (
            torch.cat([self.k[:, :, filled], k], dim=2),  # [B, H, w+m, dh]
            torch.cat([self.v[:, :, filled], v], dim=2),
            torch.cat([self.pos[filled], positions]),
        )
        self.append(k, v, positions)
        return context

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the new ``k, v[B, H, m, dh]`` (a ring keeps only the last ``window``)."""
        m = k.shape[2]
        if self.window is None:
            self._grow(self.length + m)
            slots = torch.arange(self.length, self.length + m, device=k.device)
        else:
            keep = min(m, self.window)
            k, v, positions = k[:, :, m - keep :], v[:, :, m - keep :], positions[m - keep :]
            slots = positions % self.window
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.pos[slots] = positions
        self.length += m

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.pos]

    def expected_nbytes(self) -> int:
        """Own accounting: ``2 * B * H * capacity * dh`` values plus one int64 position per slot."""
        b, h, capacity, dh = self.k.shape
        return 2 * b * h * capacity * dh * self.k.element_size() + capacity * 8


class AttentionStream:
    """KV-cache inference for :class:`AttentionLanguageModel`: ``step``/``feed`` like a PSM stream."""

    def __init__(self, model: AttentionLanguageModel, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        like = next(model.parameters())
        attn0 = model.blocks[0].attn
        self.caches = [KVCache(batch_size, attn0.n_heads, attn0.d_head, model.window, like) for _ in model.blocks]
        self.tokens_seen = 0

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens[B, m] -> logits[B, m, V]``, attending to the cache and causally among the new tokens."""
        m = tokens.shape[1]
        positions = torch.arange(self.tokens_seen, self.tokens_seen + m, device=tokens.device)  # [m]
        x = self.model.embed(tokens)  # [B, m, d]
        for block, cache in zip(self.model.blocks, self.caches):
            attn = block.attn
            q, k, v = attn.project(block.norm_attn(x), positions)  # [B, H, m, dh] x3
            keys, values, key_pos = cache.attend_context(k, v, positions)
            x = x + attn.attend(q, keys, values, positions, key_pos)
            x = x + block.mlp(block.norm_mlp(x))
        self.tokens_seen += m
        return self.model.lm_head(self.model.norm(x))  # [B, m, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens[B] -> logits[B, V]``."""
        return self.feed(tokens[:, None])[:, 0]

    @property
    def step_period(self) -> int:
        """Steps after which the cost of a step repeats: a growing cache reallocates once per
        :attr:`KVCache.BLOCK` tokens, so a latency averaged over fewer steps that include that one
        overstates it (and one that misses it understates it); a ring buffer never reallocates."""
        return 1 if self.model.window is not None else KVCache.BLOCK

    def retained(self) -> list[Any]:
        return [t for cache in self.caches for t in cache.tensors()]

    def state_nbytes(self) -> int:
        """Bytes the KV caches really hold (each storage once, measured on the tensors)."""
        return S.retained_nbytes(self.retained())

    def expected_nbytes(self) -> int:
        """The caches' own accounting of the same bytes."""
        return sum(cache.expected_nbytes() for cache in self.caches)


def validate_baseline_config(config: ModelConfig) -> None:
    """Raise a ConfigError unless ``config`` describes a buildable ``gpt`` / ``swa`` baseline."""
    if config.kind not in ("gpt", "swa"):
        raise ConfigError(f"{config.kind!r} is not a baseline; expected 'gpt' or 'swa'", field="model.kind")
    if config.d_model % config.n_heads:
        raise ConfigError(
            f"n_heads={config.n_heads} does not divide d_model={config.d_model}; choose a divisor of {config.d_model}",
            field="model.n_heads",
        )
    if (config.d_model // config.n_heads) % 2:
        raise ConfigError(
            f"RoPE needs an even head width; d_model/n_heads = {config.d_model // config.n_heads}", field="model.n_heads"
        )


def build_baseline(config: ModelConfig, vocab_size: int) -> AttentionLanguageModel:
    """The ``gpt`` or ``swa`` baseline for ``config`` (``n_heads`` must divide ``d_model``)."""
    validate_baseline_config(config)
    return AttentionLanguageModel(config, vocab_size, window=config.window if config.kind == "swa" else None)
