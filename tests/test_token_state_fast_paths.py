"""The T-PSM fast paths against the full computation they replace, written here from the weights.

The attention aggregator and head run their last transformer block on the kept rows only
(``Transformer(..., keep_from=s)``), the head's ``forward_last`` makes the newest row the only query,
and the head's mask is sliced from a buffer made at build time. Each must equal the old computation:
the whole transformer over all rows with a mask built here position by position, then sliced. The
reference below uses the modules' weights through ``torch.nn.functional`` only, so a wrong row offset,
a mask slice from the wrong corner or a block that drops rows too early fails here, in outputs or
gradients, at odd sizes (c' = 1, 3, 7; k = 3, 5, 7) in float64 with one and two leading batch dims.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from psmsearch.components import ComponentContext
from psmsearch.config import ModelConfig
from psmsearch.layers import MultiHeadAttention, Transformer
from psmsearch.model import build_model
from psmsearch.plugins.token_state import AttentionAggregator, AttentionHead, EmbedEncoder, PoolEncoder

D_MODEL = 12
HEADS = 2
BATCH_SHAPES = [(2,), (2, 3)]


def _reference_attention(attn: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """All ``T`` rows of multi-head attention over ``x[*, T, d]``, from the module's weights."""
    *batch, t, d = x.shape
    heads, dh = attn.n_heads, d // attn.n_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(d, dim=-1)  # each [*, T, d]

    def split_heads(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(*batch, t, heads, dh).transpose(-3, -2)  # [*, H, T, dh]

    scores = split_heads(q) @ split_heads(k).transpose(-1, -2) / math.sqrt(dh)  # [*, H, T, T]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    mixed = (scores.softmax(-1) @ split_heads(v)).transpose(-3, -2).reshape(*batch, t, d)  # [*, T, d]
    return F.linear(mixed, attn.out.weight, attn.out.bias)


def _reference_transformer(net: Transformer, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The old path: every block on every row, then the final norm on every row: ``[*, T, d]``."""
    for block in net.blocks:
        x = x + _reference_attention(block.attn, F.layer_norm(x, x.shape[-1:], block.norm_attn.weight,
                                                              block.norm_attn.bias), mask)
        h = F.layer_norm(x, x.shape[-1:], block.norm_mlp.weight, block.norm_mlp.bias)
        x = x + F.linear(F.gelu(F.linear(h, block.mlp.up.weight, block.mlp.up.bias)),
                         block.mlp.down.weight, block.mlp.down.bias)
    return F.layer_norm(x, x.shape[-1:], net.norm.weight, net.norm.bias)


def _reference_head_mask(k: int, width: int) -> torch.Tensor:
    """``[k+c', k+c']`` position by position: prefix rows see the prefix; chunk rows see the prefix and
    the chunk up to themselves."""
    size = k + width
    mask = torch.zeros(size, size, dtype=torch.bool)
    for query in range(size):
        for key in range(size):
            mask[query, key] = key < k or (query >= k and key <= query)
    return mask


def _reference_aggregate(agg: AttentionAggregator, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
    both = torch.cat([older + agg.segment[0], newer + agg.segment[1]], dim=-2)  # [*, 2k, d]
    return _reference_transformer(agg.mixer, both, None)[..., agg.k :, :]  # [*, k, d]


def _reference_head(head: AttentionHead, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    z = torch.cat([prefix + head.segment[0], f + head.segment[1]], dim=-2)  # [*, k+c', d]
    mask = _reference_head_mask(head.k, f.shape[-2])
    return _reference_transformer(head.reader, z, mask)[..., head.k :, :]  # [*, c', d]


def _components(encoder: str, k: int, chunk_size: int, layers: int) -> tuple[AttentionAggregator, AttentionHead]:
    """An aggregator and a head for states of ``k`` tokens, in float64, with non-trivial norms and biases."""
    torch.manual_seed(k * 100 + chunk_size * 10 + layers)
    context = ComponentContext(d_model=D_MODEL, chunk_size=chunk_size)
    enc = EmbedEncoder(context) if encoder == "embed" else PoolEncoder(context, state_tokens=k, heads=HEADS)
    assert enc.state_shape[0] == k
    context = ComponentContext(d_model=D_MODEL, chunk_size=chunk_size, encoder=enc)
    hparams = {"layers": layers, "heads": HEADS, "mlp_ratio": 2}
    agg, head = AttentionAggregator(context, **hparams).double(), AttentionHead(context, **hparams).double()
    with torch.no_grad():
        for module in (agg, head):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.3)  # LayerNorm weights away from 1, biases away from 0
    return agg, head


def _grads(out: torch.Tensor, weight: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Gradients of ``sum(out * weight)``; an input the computation does not use (the aggregator's
    ``initial``) gets zeros."""
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True, retain_graph=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


# (encoder, k, c): embed has k = c; pool has k slots independent of c
SHAPES = [("embed", 3, 3), ("embed", 7, 7), ("pool", 5, 3), ("pool", 3, 7), ("pool", 1, 1)]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("encoder, k, chunk_size", SHAPES)
def test_aggregator_equals_full_transformer_then_newer_half(encoder: str, k: int, chunk_size: int,
                                                            batch: tuple[int, ...], layers: int) -> None:
    agg, _ = _components(encoder, k, chunk_size, layers)
    older = torch.randn(*batch, k, D_MODEL, dtype=torch.float64, requires_grad=True)  # [*, k, d]
    newer = torch.randn(*batch, k, D_MODEL, dtype=torch.float64, requires_grad=True)  # [*, k, d]
    got, want = agg(older, newer), _reference_aggregate(agg, older, newer)
    assert got.shape == (*batch, k, D_MODEL)
    torch.testing.assert_close(got, want)
    weight = torch.randn_like(want)
    inputs = [older, newer, *agg.parameters()]
    for g, w in zip(_grads(got, weight, inputs), _grads(want, weight, inputs)):
        torch.testing.assert_close(g, w)


def test_aggregator_state_is_a_fresh_tensor_of_k_rows() -> None:
    """The state streaming keeps must not pin the discarded older rows (the old path cloned for this)."""
    agg, _ = _components("pool", 5, 3, 2)
    state = agg(torch.randn(2, 5, D_MODEL, dtype=torch.float64), torch.randn(2, 5, D_MODEL, dtype=torch.float64))
    assert state.untyped_storage().nbytes() == state.numel() * state.element_size()


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("encoder, k, chunk_size", SHAPES)
def test_head_equals_full_transformer_then_chunk_rows(encoder: str, k: int, chunk_size: int,
                                                      batch: tuple[int, ...], layers: int) -> None:
    """Every partial width c' <= c (streaming's), forward and forward_last, outputs and gradients."""
    _, head = _components(encoder, k, chunk_size, layers)
    for width in sorted({1, 3, 7} & set(range(1, chunk_size + 1)) | {chunk_size}):
        prefix = torch.randn(*batch, k, D_MODEL, dtype=torch.float64, requires_grad=True)  # [*, k, d]
        f = torch.randn(*batch, width, D_MODEL, dtype=torch.float64, requires_grad=True)  # [*, c', d]
        want = _reference_head(head, prefix, f)  # [*, c', d]
        got = head(prefix, f)
        assert got.shape == (*batch, width, D_MODEL)
        torch.testing.assert_close(got, want, msg=lambda m, w=width: f"c'={w}: {m}")
        inputs = [prefix, f, *head.parameters()]
        weight = torch.randn_like(want)
        for g, w in zip(_grads(got, weight, inputs), _grads(want, weight, inputs)):
            torch.testing.assert_close(g, w, msg=lambda m, w=width: f"c'={w}, gradient: {m}")
        last = head.forward_last(prefix, f)  # [*, d]
        assert last.shape == (*batch, D_MODEL)
        torch.testing.assert_close(last, want[..., -1, :], msg=lambda m, w=width: f"forward_last, c'={w}: {m}")
        weight = weight[..., -1, :]
        for g, w in zip(_grads(last, weight, inputs), _grads(want[..., -1, :], weight, inputs)):
            torch.testing.assert_close(g, w, msg=lambda m, w=width: f"forward_last c'={w}, gradient: {m}")


@pytest.mark.parametrize("encoder, k, chunk_size", SHAPES)
def test_head_mask_is_the_position_rule_at_every_width(encoder: str, k: int, chunk_size: int) -> None:
    _, head = _components(encoder, k, chunk_size, 1)
    for width in range(1, chunk_size + 2):  # one wider than c: made anew, not sliced
        assert torch.equal(head._mask(width, torch.device("cpu")), _reference_head_mask(k, width)), width
    assert "full_mask" not in head.state_dict(), "the mask is derived, not a parameter to checkpoint"


@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("keep_from", [1, 4, 6])
def test_transformer_keep_from_equals_slice_of_all_rows(keep_from: int, batch: tuple[int, ...]) -> None:
    """Any split point, with an arbitrary (non-causal, non-symmetric) mask: only the last block's rows shrink."""
    torch.manual_seed(keep_from)
    net = Transformer(D_MODEL, HEADS, 3, mlp_ratio=2).double()
    x = torch.randn(*batch, 7, D_MODEL, dtype=torch.float64, requires_grad=True)  # [*, T, d]
    mask = torch.rand(7, 7) < 0.6
    mask.fill_diagonal_(True)  # every row sees something
    want = _reference_transformer(net, x, mask)[..., keep_from:, :]
    got = net(x, mask, keep_from=keep_from)
    torch.testing.assert_close(got, want)
    weight = torch.randn_like(want)
    inputs = [x, *net.parameters()]
    for g, w in zip(_grads(got, weight, inputs), _grads(want, weight, inputs)):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="keep_from=7"):
        net(x, mask, keep_from=7)


@pytest.mark.parametrize("encoder, chunk_size", [("embed", 3), ("embed", 7), ("pool", 7)])
def test_streaming_equals_parallel(encoder: str, chunk_size: int) -> None:
    """Token by token (forward_last on each partial chunk) equals the parallel pass, float64, T not a multiple of c."""
    torch.manual_seed(chunk_size)
    params = {"layers": 2, "heads": HEADS, "mlp_ratio": 2}
    config = ModelConfig(d_model=D_MODEL, n_layers=2, chunk_size=chunk_size, encoder=encoder,
                         aggregator={"name": "attention", **params}, head={"name": "attention", **params})
    model = build_model(config, vocab_size=11).double().eval()
    tokens = torch.randint(0, 11, (2, 4 * chunk_size + 2))  # [B, T]
    with torch.no_grad():
        parallel = model(tokens)  # [B, T, V]
        stream = model.stream(2)
        streamed = torch.stack([stream.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)  # [B, T, V]
    torch.testing.assert_close(streamed, parallel)
