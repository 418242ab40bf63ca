"""Measured inference metrics: retained bytes equal each model's accounting; T-PSM stays logarithmic."""

from __future__ import annotations

import math

import pytest
import torch

from psmsearch.config import ModelConfig
from psmsearch.metrics import MetricsConfig, inference_metrics, measure_streaming, parameter_count
from psmsearch.model import build_model
from psmsearch.scan import OnlineScan, held_state_counts
from psmsearch.tasks import count_tag

VOCAB = 11


def psm(chunk_size: int, n_layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        d_model=16, n_layers=n_layers, chunk_size=chunk_size,
        aggregator={"name": "attention", "layers": 1, "heads": 2}, head={"name": "attention", "layers": 1, "heads": 2},
    )
    return build_model(config, VOCAB)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_psm_bytes_match_accounting_and_stay_logarithmic(chunk_size: int) -> None:
    model = psm(chunk_size, n_layers=2)
    lengths = [1, 5, 64, 255, 1000, 2048]
    out = measure_streaming(model, VOCAB, memory_lengths=lengths, latency_lengths=[], feed_chunk=64)
    state_bytes = chunk_size * 16 * 4  # embed encoder: c vectors of d floats per state
    for n in lengths:
        tag = count_tag(n)
        measured, expected, states = out[f"state_bytes_{tag}"], out[f"expected_state_bytes_{tag}"], out[f"num_states_{tag}"]
        assert measured == expected
        roots = math.ceil(math.log2(n // chunk_size + 1))
        assert states <= 2 * roots * 2  # per layer: roots plus cached folds; two layers
        partial = (n % chunk_size) * 16 * 4 * 2  # buffered features of the partial chunk, both layers
        assert measured <= states * state_bytes + partial + 2 * state_bytes  # + the prefix fold per layer


def affine(chunk_size: int) -> torch.nn.Module:
    """Linear attention: its partial-chunk features (q, k, v per token) outweigh its one state."""
    torch.manual_seed(0)
    config = ModelConfig(
        d_model=16, n_layers=1, chunk_size=chunk_size, encoder={"name": "linear_attention", "heads": 2},
        aggregator="affine_scalar", head="linear_readout_scalar",
    )
    return build_model(config, VOCAB)


@pytest.mark.parametrize(("build", "chunk_size"), [(psm, 1), (psm, 4), (affine, 8)])
def test_peak_state_bytes_are_the_worst_case_up_to_n(build, chunk_size: int) -> None:
    """At a power-of-two chunk count the binary-counter scan holds one root, its best case; the peak is
    the most the stream holds at any token count up to n, found here by a loop over every token.
    n = 14 and 100 are no powers of two: at c = 1 the most up to 14 is held after 13 chunks
    (5 states, more than at 7 or 15), and the peak measured at 2^k - 1 chunks alone was short there."""
    lengths = [5, 14, 64, 100, 256]
    out = measure_streaming(build(chunk_size), VOCAB, memory_lengths=lengths, latency_lengths=[], feed_chunk=64)
    stream, most_bytes, most_states = build(chunk_size).stream(1), {}, {}
    worst_bytes = worst_states = 0
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for seen in range(1, max(lengths) + 1):
            stream.feed(torch.randint(VOCAB, (1, 1), generator=generator))
            worst_bytes, worst_states = max(worst_bytes, stream.state_nbytes()), max(worst_states, stream.num_states)
            if seen in lengths:
                most_bytes[seen], most_states[seen] = worst_bytes, worst_states
    for n in lengths:
        tag = count_tag(n)
        assert out[f"peak_state_bytes_{tag}"] == most_bytes[n], (n, out[f"peak_state_bytes_{tag}"], most_bytes[n])
        assert out[f"peak_num_states_{tag}"] == most_states[n], (n, out[f"peak_num_states_{tag}"], most_states[n])
        if n in (64, 256):
            assert out[f"peak_state_bytes_{tag}"] > out[f"state_bytes_{tag}"], "n is a power of two: the best case"


def test_held_state_counts_follow_the_online_scan() -> None:
    """The count worked out on flags equals the distinct states a real non-associative OnlineScan
    retains after every push up to 3000, and its records are where the peak metric measures."""
    class Halving(torch.nn.Module):
        associative = False

        def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
            return 0.5 * older + newer

        def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(*batch_shape, 1)

    scan, held = OnlineScan(Halving(), (1,)), [0]
    for _ in range(3000):
        scan.push(torch.ones(1, 1))
        held.append(len({id(s) for s in scan.retained()}))
    assert held_state_counts(3000) == held
    records = [m for m in range(len(held)) if held[m] > max(held[:m], default=-1)]
    assert records == [0, 1, 3, 7, 13, 27, 53, 107, 213, 427, 853, 1707]
    assert held[853] == 11 > held[511] == 10


@pytest.mark.parametrize("n", [1, 5, 7])
def test_an_affine_stream_counts_its_zero_state_before_the_first_chunk(n: int) -> None:
    """Before its first chunk (c = 8) an affine stream holds the aggregator's zero state, a fresh
    allocation, beside the buffered features: both heads' 16 x 16 float32 memory and log-decay
    (2,056 bytes) plus 392 bytes per token (q, k, v of 2 x 16 and the gate of 2 x 1 floats).
    It was left out until a chunk completed."""
    out = measure_streaming(affine(8), VOCAB, memory_lengths=[n], latency_lengths=[], feed_chunk=64)
    zero_state = 2 * 16 * 16 * 4 + 2 * 4
    assert out[f"state_bytes_{n}"] == out[f"expected_state_bytes_{n}"] == zero_state + 392 * n


def test_a_t_psm_stream_does_not_count_its_learned_initial_state() -> None:
    """T-PSM's initial prefix is the aggregator's parameter expanded over the batch: model memory,
    held whether or not anything streams, so a stream with 1 buffered token holds only its features."""
    out = measure_streaming(psm(4), VOCAB, memory_lengths=[1], latency_lengths=[], feed_chunk=64)
    assert out["state_bytes_1"] == out["expected_state_bytes_1"] == 16 * 4  # one token's d = 16 floats


def test_timing_latency_does_not_move_where_memory_is_measured() -> None:
    """A latency length just before a memory length: memory is still measured at exactly n, and the
    fullest point 2^10 - 1 on the way is still seen."""
    alone = measure_streaming(psm(1), VOCAB, memory_lengths=[1024], latency_lengths=[], feed_chunk=64)
    with_latency = measure_streaming(psm(1), VOCAB, memory_lengths=[1024], latency_lengths=[1020], latency_tokens=16, feed_chunk=64)
    for key in ("state_bytes_1k", "num_states_1k", "peak_state_bytes_1k", "peak_num_states_1k"):
        assert with_latency[key] == alone[key], key
    assert alone["num_states_1k"] == 1 and alone["peak_num_states_1k"] == 11  # 1023 = ten roots + the prefix fold


def test_latency_is_timed_over_whole_chunks_so_the_aggregator_is_in_it() -> None:
    """With c = 8 and latency_tokens = 3 the timed window is one whole chunk: its last step completes
    the chunk and calls the aggregator, as a stream driven by hand shows."""
    model = psm(8)
    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    hooks = [block.mixer.aggregator.register_forward_hook(count) for block in model.blocks]
    measure_streaming(model, VOCAB, memory_lengths=[], latency_lengths=[16], latency_tokens=3, feed_chunk=64)
    measured = calls["n"]
    calls["n"] = 0
    with torch.no_grad():
        stream = model.stream(1)
        stream.feed(torch.randint(VOCAB, (1, 16)))
        fed = calls["n"]
        for _ in range(8):
            stream.step(torch.randint(VOCAB, (1,)))
    for hook in hooks:
        hook.remove()
    assert measured == calls["n"] > fed


def test_psm_state_grows_much_slower_than_gpt_kv_cache() -> None:
    gpt = build_model(ModelConfig(kind="gpt", d_model=16, n_layers=1, n_heads=2), VOCAB)
    lengths = [256, 4096]
    ours = measure_streaming(psm(1), VOCAB, lengths, [], feed_chunk=256)
    theirs = measure_streaming(gpt, VOCAB, lengths, [], feed_chunk=256)
    assert theirs["state_bytes_4k"] == theirs["expected_state_bytes_4k"]
    assert theirs["state_bytes_4k"] >= 14 * theirs["state_bytes_256"]  # linear
    assert ours["state_bytes_4k"] <= 2 * ours["state_bytes_256"]  # logarithmic
    assert theirs["state_bytes_4k"] > 50 * ours["state_bytes_4k"]


def test_swa_bytes_are_constant() -> None:
    swa = build_model(ModelConfig(kind="swa", d_model=16, n_layers=1, n_heads=2, window=32), VOCAB)
    out = measure_streaming(swa, VOCAB, [64, 1024, 2048], [], feed_chunk=100)
    assert out["state_bytes_64"] == out["state_bytes_1k"] == out["state_bytes_2k"] == out["expected_state_bytes_2k"]


def test_latency_and_params_reported() -> None:
    model = psm(4)
    out = inference_metrics(model, VOCAB, MetricsConfig(memory_lengths=[64], latency_lengths=[32, 64], latency_tokens=3))
    assert out["params"] == parameter_count(model) == sum(p.numel() for p in model.parameters())
    assert out["latency_ms_32"] > 0 and out["latency_ms_64"] > 0
    assert out["latency_max_ms_32"] >= out["latency_ms_32"] and out["latency_max_ms_64"] >= out["latency_ms_64"]
    assert "state_bytes_64" in out
    assert set(inference_metrics(model, VOCAB, MetricsConfig(enabled=False))) == {"params"}


def test_a_growing_kv_cache_is_timed_over_a_whole_block_of_steps() -> None:
    """A GPT's cache reallocates once per 256 tokens; 16 steps from n = 1024 (a block edge) weighted that
    step 1/16 instead of 1/256. The window is now whole blocks: counted here by the steps it runs."""
    from psmsearch.baselines import AttentionStream, KVCache
    from psmsearch.config import ModelConfig
    from psmsearch.model import build_model

    steps = {"n": 0}
    original = AttentionStream.step

    def counting(self: AttentionStream, tokens: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        return original(self, tokens)

    gpt = build_model(ModelConfig(kind="gpt", d_model=16, n_heads=2, n_layers=1), vocab_size=VOCAB).eval()
    swa = build_model(ModelConfig(kind="swa", d_model=16, n_heads=2, n_layers=1, window=8), vocab_size=VOCAB).eval()
    AttentionStream.step = counting  # type: ignore[method-assign]
    try:
        measure_streaming(gpt, VOCAB, memory_lengths=[], latency_lengths=[256], latency_tokens=16, feed_chunk=64)
        timed_gpt, steps["n"] = steps["n"], 0
        measure_streaming(swa, VOCAB, memory_lengths=[], latency_lengths=[256], latency_tokens=16, feed_chunk=64)
    finally:
        AttentionStream.step = original  # type: ignore[method-assign]
    assert timed_gpt == KVCache.BLOCK == 256
    assert steps["n"] == 16  # a ring buffer never reallocates: the window stays as asked
