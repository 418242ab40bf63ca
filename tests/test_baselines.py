"""GPT and sliding-window baselines: streaming == parallel, causality, windows, KV-cache accounting."""

from __future__ import annotations

import pytest
import torch

from psmsearch.baselines import apply_rope, build_baseline, rope_angles
from psmsearch.config import ModelConfig
from psmsearch.errors import ConfigError
from psmsearch.model import build_model

VOCAB = 13


def make(kind: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, d_model=32, n_layers=2, n_heads=4, window=6, **overrides)
    return build_model(config, VOCAB).eval()


def stream_mixed(model: torch.nn.Module, tokens: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits from a stream fed single steps (piece 1) and multi-token feeds (piece > 1)."""
    stream = model.stream(tokens.shape[0])
    out, start = [], 0
    for width in pieces:
        part = tokens[:, start : start + width]
        out.append(stream.step(part[:, 0])[:, None] if width == 1 else stream.feed(part))
        start += width
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["gpt", "swa"])
def test_streaming_equals_parallel(kind: str) -> None:
    model = make(kind)
    tokens = torch.randint(VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(tokens)  # [B, T, V]
    for pieces in ([1] * 50, [7, 1, 1, 20, 1, 20], [50], [3] * 16 + [2]):
        torch.testing.assert_close(stream_mixed(model, tokens, pieces), parallel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt", "swa"])
def test_no_tokens_give_empty_logits_in_parallel_and_streaming(kind: str) -> None:
    """The parallel pass raised on T = 0 ("cannot reshape tensor of 0 elements"), unlike a PSM's."""
    model = make(kind)
    empty = torch.zeros(2, 0, dtype=torch.long)  # [B, 0]
    with torch.no_grad():
        assert model(empty).shape == (2, 0, VOCAB)
        assert model.stream(2).feed(empty).shape == (2, 0, VOCAB)


@pytest.mark.parametrize("kind", ["gpt", "swa"])
def test_causal(kind: str) -> None:
    model = make(kind)
    tokens = torch.randint(VOCAB, (2, 30))
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :20], model(changed)[:, :20])
        assert not torch.allclose(model(tokens)[:, 20:], model(changed)[:, 20:])


def test_swa_with_a_wide_window_is_gpt() -> None:
    gpt = make("gpt")
    swa = build_model(ModelConfig(kind="swa", d_model=32, n_layers=2, n_heads=4, window=40), VOCAB).eval()
    swa.load_state_dict(gpt.state_dict())
    tokens = torch.randint(VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(swa(tokens), gpt(tokens))


def test_swa_forgets_beyond_the_window() -> None:
    """With one layer, the output at t depends on tokens t-window+1..t only."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="swa", d_model=32, n_layers=1, n_heads=4, window=6), VOCAB).eval()
    tokens = torch.randint(VOCAB, (1, 30))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        diff = (model(tokens) - model(changed)).abs().amax(-1)[0]  # [T]
    assert (diff[10:16] > 0).all() and (diff[16:] == 0).all() and (diff[:10] == 0).all()


def test_rope_scores_depend_on_relative_position_only() -> None:
    q, k = torch.randn(1, 8), torch.randn(1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        cos_i, sin_i = rope_angles(torch.tensor([i]), 8)
        cos_j, sin_j = rope_angles(torch.tensor([j]), 8)
        return (apply_rope(q, cos_i, sin_i) * apply_rope(k, cos_j, sin_j)).sum()

    torch.testing.assert_close(score(5, 2), score(1005, 1002), atol=1e-4, rtol=1e-4)


def test_gpt_runs_far_beyond_any_training_length() -> None:
    model = make("gpt")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(VOCAB, (1, 1024)))).all()


def test_kv_cache_bytes_measured_equal_accounting() -> None:
    gpt, swa = make("gpt"), make("swa")
    gs, ss = gpt.stream(2), swa.stream(2)
    sizes = []
    for _ in range(5):
        tokens = torch.randint(VOCAB, (2, 37))
        gs.feed(tokens)
        ss.feed(tokens)
        assert gs.state_nbytes() == gs.expected_nbytes()
        assert ss.state_nbytes() == ss.expected_nbytes()
        sizes.append(ss.state_nbytes())
    # SWA holds exactly `window` slots per layer: 2 layers x (k, v) x B x window x d + positions.
    assert sizes == [2 * (2 * 2 * 6 * 32 * 4 + 6 * 8)] * 5
    per_token = 2 * 2 * 2 * 32 * 4  # layers x (k, v) x B x d x 4 bytes
    assert gs.state_nbytes() == 256 * per_token + 256 * 8 * 2  # 185 tokens fit one 256-slot block


def test_bad_head_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_heads.*n_heads=5 does not divide d_model=32"):
        build_baseline(ModelConfig(kind="gpt", d_model=32, n_heads=5), VOCAB)
