"""Language models over PSM layers (DESIGN.md §4) and the model-kind dispatch.

``embedding -> L x (norm, PSM layer, residual, norm, MLP, residual) -> norm -> head``. There are no
absolute positions: the only positions are chunk-local ones inside the encoders, identical in
training and streaming, so a model trained on length L can be run on any length.

Every model kind implements the same protocol: ``forward(tokens[B, T]) -> logits[B, T, V]`` and
``stream(batch_size)`` returning an object with ``step(tokens[B]) -> logits[B, V]``,
``feed(tokens[B, m]) -> logits[B, m, V]``, ``state_nbytes()`` and ``expected_nbytes()``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from psmsearch import states as S
from psmsearch.composer import LayerStream, PSMLayer
from psmsearch.config import ModelConfig
from psmsearch.layers import MLP
from psmsearch.registry import Registry


class ModelStream(Protocol):
    """Streaming inference state of a model."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def feed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def state_nbytes(self) -> int: ...

    def expected_nbytes(self) -> int: ...


class PSMBlock(nn.Module):
    """Pre-norm residual block with a PSM layer as its sequence mixer."""

    def __init__(self, layer: PSMLayer, d_model: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_mix = nn.LayerNorm(d_model)
        self.mixer = layer
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm_mix(x)))  # [B, T, d]
        return x + self.dropout(self.mlp(self.norm_mlp(x)))

    def stream_chunk(self, stream: LayerStream, x: torch.Tensor) -> torch.Tensor:
        """The block on ``x[B, m, d]`` with the mixer in streaming mode."""
        x = x + stream.feed(self.norm_mix(x))
        return x + self.mlp(self.norm_mlp(x))


class PSMLanguageModel(nn.Module):
    """A token-level language model whose sequence mixers are PSM layers."""

    def __init__(self, config: ModelConfig, vocab_size: int, registry: Registry | None = None) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        d = config.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.blocks = nn.ModuleList(
            PSMBlock(PSMLayer.from_config(config, registry), d, config.mlp_ratio, config.dropout)
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))  # [B, T, V]

    def stream(self, batch_size: int) -> "PSMModelStream":
        return PSMModelStream(self, batch_size)


class PSMModelStream:
    """Token-by-token (or chunk-by-chunk) inference for :class:`PSMLanguageModel`."""

    def __init__(self, model: PSMLanguageModel, batch_size: int) -> None:
        self.model = model
        self.layers = [block.mixer.stream(batch_size) for block in model.blocks]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens[B, m] -> logits[B, m, V]``; aligned whole chunks are processed in one call."""
        x = self.model.embed(tokens)  # [B, m, d]
        for block, stream in zip(self.model.blocks, self.layers):
            x = block.stream_chunk(stream, x)
        return self.model.lm_head(self.model.norm(x))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens[B] -> logits[B, V]``: one new token per sequence."""
        return self.feed(tokens[:, None])[:, 0]

    def retained(self) -> list[Any]:
        return [t for stream in self.layers for t in stream.retained()]

    def state_nbytes(self) -> int:
        """Bytes the streaming state really holds, measured on its tensors."""
        return S.retained_nbytes(self.retained())

    def expected_nbytes(self) -> int:
        """The components' own accounting of the same bytes."""
        return sum(stream.expected_nbytes() for stream in self.layers)

    @property
    def num_states(self) -> int:
        """Chunk states held over all layers (roots plus cached folds)."""
        return sum(len({id(s) for s in stream.scan.retained()}) for stream in self.layers)


def build_model(config: ModelConfig, vocab_size: int, registry: Registry | None = None) -> nn.Module:
    """Build the model of ``config.kind`` (``psm``, or the ``gpt`` / ``swa`` baselines)."""
    if config.kind == "psm":
        return PSMLanguageModel(config, vocab_size, registry)
    from psmsearch.baselines import build_baseline

    return build_baseline(config, vocab_size)
