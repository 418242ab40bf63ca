"""Token-state components: the paper's T-PSM and relatives (``state_kind = "tokens"``).

A state is a short sequence of vectors ``[*, k, d]``. The ``embed`` encoder keeps a chunk's own
``c`` vectors (``k = c``); ``pool`` attention-pools a chunk into ``k`` learned slots, so state
size does not grow with the chunk size. The ``attention`` aggregator is a small bidirectional
transformer over ``[older | newer]`` that keeps the newer half (non-associative); ``mlp`` mixes
the two states slot by slot. The ``attention`` head is a transformer over ``[prefix | chunk]``,
causal within the chunk.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from psmsearch import Aggregator, ComponentContext, Encoder, Head, HyperParameter, hookimpl
from psmsearch.layers import MLP, Transformer

HEADS = HyperParameter("heads", "categorical", 4, choices=(1, 2, 4, 8), help="attention heads (must divide d_model)")
LAYERS = HyperParameter("layers", "int", 2, low=1, high=6, help="transformer layers")
MLP_RATIO = HyperParameter("mlp_ratio", "int", 2, low=1, high=8, help="hidden width of the MLPs, in multiples of d_model")
TOKENS = "tokens"


def _check_heads(context: ComponentContext, heads: int, who: str) -> None:
    if context.d_model % heads:
        raise ValueError(f"{who}: heads={heads} does not divide d_model={context.d_model}")


class _ChunkLocalFeatures(Encoder):
    """Shared ``features``: a linear projection plus a learned chunk-local position embedding."""

    state_kind = TOKENS

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d = context.d_model
        self.proj = nn.Linear(d, d)
        self.position = nn.Parameter(torch.randn(context.chunk_size, d) * 0.02)  # [c, d]

    def features(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x[*, c', d] -> f[*, c', d]``: token-local, positions ``offset .. offset + c' - 1``."""
        width = x.shape[-2]
        return self.proj(x) + self.position[offset : offset + width]  # [*, c', d]


class EmbedEncoder(_ChunkLocalFeatures):
    """The chunk's own vectors are the state (``k = c``), as in the paper's T-PSM."""

    name = "embed"

    def summarize(self, f: torch.Tensor) -> torch.Tensor:
        return f  # [*, c, d]

    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.context.chunk_size, self.context.d_model)


class PoolEncoder(_ChunkLocalFeatures):
    """Attention-pools a chunk into ``state_tokens`` learned slots: state size independent of ``c``."""

    name = "pool"
    hyperparameters = (
        HyperParameter("state_tokens", "int", 4, low=1, high=64, help="slots per state (k)"),
        HEADS,
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d, heads = context.d_model, self.hparams["heads"]
        _check_heads(context, heads, "encoder 'pool'")
        self.slots = nn.Parameter(torch.randn(self.hparams["state_tokens"], d) * 0.02)  # [k, d]
        self.norm = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)
        self.heads = heads

    def summarize(self, f: torch.Tensor) -> torch.Tensor:
        *batch, c, d = f.shape
        k = self.slots.shape[0]
        dh = d // self.heads
        q = self.query(self.slots).view(k, self.heads, dh).transpose(0, 1)  # [H, k, dh]
        kv = self.key_value(self.norm(f)).view(*batch, c, 2, self.heads, dh)  # [*, c, 2, H, dh]
        keys, values = kv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each [*, H, c, dh]
        weights = (q @ keys.transpose(-1, -2) / dh**0.5).softmax(-1)  # [*, H, k, c]
        pooled = (weights @ values).transpose(-3, -2).reshape(*batch, k, d)  # [*, k, d]
        return self.slots + pooled

    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.hparams["state_tokens"], self.context.d_model)


def _state_tokens(context: ComponentContext, who: str) -> int:
    encoder = context.encoder
    if encoder is None:
        raise ValueError(f"{who} needs the encoder in its context to know the state shape")
    return int(encoder.state_shape[0])


class AttentionAggregator(Aggregator):
    """Bidirectional transformer over ``[older | newer]`` keeping the newer half (the T-PSM ``Agg``)."""

    name = "attention"
    state_kind = TOKENS
    associative = False
    hyperparameters = (LAYERS, HEADS, MLP_RATIO)

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d = context.d_model
        _check_heads(context, self.hparams["heads"], "aggregator 'attention'")
        self.k = _state_tokens(context, "aggregator 'attention'")
        self.segment = nn.Parameter(torch.randn(2, 1, d) * 0.02)  # [older/newer, 1, d]
        self.mixer = Transformer(d, self.hparams["heads"], self.hparams["layers"], self.hparams["mlp_ratio"])
        self.initial = nn.Parameter(torch.zeros(self.k, d))  # [k, d]

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        both = torch.cat([older + self.segment[0], newer + self.segment[1]], dim=-2)  # [*, 2k, d]
        # Only the newer half is kept, so the last block computes only its k rows (keys and values
        # still from all 2k). The result is a fresh [*, k, d] tensor: a state pins no discarded rows.
        return self.mixer(both, keep_from=self.k)  # [*, k, d]

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return self.initial.expand(*batch_shape, *self.initial.shape)  # [*, k, d]


class MLPAggregator(Aggregator):
    """Slot-wise MLP on ``[older, newer]`` with a residual on ``newer`` (cheap, non-associative)."""

    name = "mlp"
    state_kind = TOKENS
    associative = False
    hyperparameters = (MLP_RATIO,)

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d = context.d_model
        self.k = _state_tokens(context, "aggregator 'mlp'")
        self.norm = nn.LayerNorm(2 * d)
        self.mix = nn.Sequential(nn.Linear(2 * d, d), MLP(d, self.hparams["mlp_ratio"]))
        self.out_norm = nn.LayerNorm(d)
        self.initial = nn.Parameter(torch.zeros(self.k, d))  # [k, d]

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        both = torch.cat([older, newer], dim=-1)  # [*, k, 2d]
        return self.out_norm(newer + self.mix(self.norm(both)))  # [*, k, d]

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return self.initial.expand(*batch_shape, *self.initial.shape)  # [*, k, d]


class AttentionHead(Head):
    """Transformer over ``[prefix | chunk]``: prefix tokens see each other, chunk tokens are causal."""

    name = "attention"
    state_kind = TOKENS
    hyperparameters = (LAYERS, HEADS, MLP_RATIO)

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d = context.d_model
        _check_heads(context, self.hparams["heads"], "head 'attention'")
        self.k = _state_tokens(context, "head 'attention'")
        self.segment = nn.Parameter(torch.randn(2, 1, d) * 0.02)  # [prefix/chunk, 1, d]
        self.reader = Transformer(d, self.hparams["heads"], self.hparams["layers"], self.hparams["mlp_ratio"])
        # The mask of a full chunk, made once; the mask of a partial chunk of c' tokens is its top-left
        # [k+c', k+c'] corner (a row's visibility depends only on the two positions). Not persistent,
        # so checkpoints stay as they were; made again whenever the module is moved, materialised
        # (to_empty after a meta-device build) or loaded (see _remake_mask).
        self.register_buffer("full_mask", self._make_mask(context.chunk_size, self.segment.device), persistent=False)
        self.register_load_state_dict_post_hook(_remake_mask_after_load)

    def _apply(self, fn: Any, recurse: bool = True) -> "AttentionHead":
        """``.to()``, ``.cuda()``, ``to_empty()``...: afterwards the mask is made again on the parameters'
        device (``to_empty`` would otherwise leave it as uninitialised memory)."""
        super()._apply(fn, recurse)
        self._remake_mask()
        return self

    def _remake_mask(self) -> None:
        self.full_mask = self._make_mask(self.context.chunk_size, self.segment.device)  # [k+c, k+c]

    def _make_mask(self, width: int, device: torch.device) -> torch.Tensor:
        """``[k+c', k+c']``: everyone sees the whole prefix, the prefix sees no chunk token, the chunk is causal."""
        position = torch.arange(self.k + width, device=device)
        query, key = position[:, None], position[None, :]                        # [k+c', 1], [1, k+c']
        return ((key <= query) | (key < self.k)) & ~((query < self.k) & (key >= self.k))

    def _mask(self, width: int, device: torch.device) -> torch.Tensor:
        """The ``[k+c', k+c']`` mask for a chunk of ``width = c'`` tokens, a slice of ``full_mask``.

        The buffer is made at build time, outside any ``torch.func`` transform, so ``vmap(grad)``
        and ``torch.export`` see an ordinary constant (a mask cached lazily inside a transform
        would belong to that transform and fail in every later call). A chunk wider than the
        layer's ``c`` (not something the composer sends) or on another device gets a new mask.
        """
        mask = self.full_mask
        if width > mask.shape[0] - self.k or mask.device != device:
            return self._make_mask(width, device)
        return mask[: self.k + width, : self.k + width]  # [k+c', k+c']

    def _read(self, prefix: torch.Tensor, f: torch.Tensor, keep_from: int) -> torch.Tensor:
        """Rows ``keep_from..`` of the reader over ``[prefix | chunk]``; only they are computed in the last block."""
        z = torch.cat([prefix + self.segment[0], f + self.segment[1]], dim=-2)  # [*, k+c', d]
        return self.reader(z, self._mask(f.shape[-2], z.device), keep_from=keep_from)  # [*, k+c'-s, d]

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self._read(prefix, f, self.k)  # [*, c', d]: the chunk rows are the only queries of the last block

    def forward_last(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Only the newest token's output ``[*, d]``: it is the last block's single query row."""
        return self._read(prefix, f, self.k + f.shape[-2] - 1)[..., 0, :]  # [*, d]


def _remake_mask_after_load(module: "AttentionHead", _incompatible_keys: Any) -> None:
    """A load with ``assign=True`` replaces the parameters (perhaps from the meta device to a real one)
    but leaves the non-persistent mask where it was."""
    module._remake_mask()


@hookimpl
def register_encoders(register: Callable[..., None]) -> None:
    register(EmbedEncoder)
    register(PoolEncoder)


@hookimpl
def register_aggregators(register: Callable[..., None]) -> None:
    register(AttentionAggregator)
    register(MLPAggregator)


@hookimpl
def register_heads(register: Callable[..., None]) -> None:
    register(AttentionHead)
